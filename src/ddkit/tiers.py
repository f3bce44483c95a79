"""The three tiers (presets) that every method, teacher recipe and evaluation protocol defines.

``paper`` is the published recipe; ``quick`` the same algorithm made smaller to run in minutes on
two CPU cores; ``smoke`` seconds, for tests. Each engine keeps its own settings per tier (a dict
keyed by these names, checked with :func:`check_tier_table` when the module loads); this module is
the one place the names themselves are declared.
"""

from __future__ import annotations

from collections.abc import Mapping

from ddkit.errors import DDKitError

TIERS: tuple[str, ...] = ("smoke", "quick", "paper")
DEFAULT_TIER = "quick"
#: The choices as help texts write them.
TIER_CHOICES = " | ".join(TIERS)


def check_tier(tier: object, what: str = "preset") -> str:
    """``tier`` itself if it is one of :data:`TIERS`; else DDKitError naming the choices.

    ``what`` names the setting in the message (``"preset"``, ``"squeeze preset"``, ``"tier"``).
    """
    if not isinstance(tier, str) or tier not in TIERS:
        raise DDKitError(f"unknown {what} {tier!r}; choose one of: {', '.join(TIERS)}")
    return tier


def check_tier_table(table: Mapping, name: str) -> Mapping:
    """``table`` itself if its keys are exactly :data:`TIERS`; else DDKitError (a table that misses
    or adds a tier is a programming error, caught when the module defining it loads)."""
    if set(table) != set(TIERS):
        raise DDKitError(f"{name} must define exactly the tiers {', '.join(TIERS)}; it has {', '.join(table)}")
    return table
