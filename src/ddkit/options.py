"""Option constraints as data: each engine declares one table ``{option: constraint}`` next to its
defaults, and :func:`check_table` refuses a configuration that breaks one, in one line.

A constraint is a function ``(what, name, value) -> None`` that raises
:class:`ddkit.errors.DDKitError` (``"<what> option <name>=<value> is not valid; <the rule>"``);
:func:`number`, :func:`flag` and :func:`choice` make the usual ones. Names may be dotted
(``queue.lr``) to reach into nested options. Rules that tie several options together (a partition
factor that must divide the image size) stay in code beside the table.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from ddkit.errors import DDKitError
from ddkit.utils import check_flag, check_number, check_option

Constraint = Callable[[str, str, Any], None]
_MISSING = object()


def _or_allowed(check: Callable, allow: tuple) -> Constraint:
    def constraint(what: str, name: str, value: Any) -> None:
        if any(value is item or (item is not None and value == item and type(value) is type(item))
               for item in allow):
            return
        try:
            check(what, name, value)
        except DDKitError as exc:
            if not allow:
                raise
            spelled = ", ".join("null" if item is None else str(item).lower() if isinstance(item, bool) else str(item)
                                for item in allow)
            raise DDKitError(f"{exc}, or {spelled}") from None

    return constraint


def number(integer: bool = False, minimum: float | None = None, above: float | None = None,
           maximum: float | None = None, allow: tuple = ()) -> Constraint:
    """A number (an integer when ``integer``) with ``value >= minimum``, ``> above``, ``<= maximum``
    (each optional), or one of the literal values ``allow`` (``"auto"``, ``None``)."""
    return _or_allowed(lambda what, name, value: check_number(what, name, value, integer=integer, minimum=minimum,
                                                              above=above, maximum=maximum), allow)


def flag(allow: tuple = ()) -> Constraint:
    """true or false, or one of the literal values ``allow`` (``"auto"``)."""
    return _or_allowed(check_flag, allow)


def choice(*values: str) -> Constraint:
    """One of the strings ``values``."""
    return lambda what, name, value: check_option(what, name, value, values)


def lookup(config: Mapping, dotted: str, default: Any = None) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``; ``default`` where a part is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def check_table(config: Mapping, table: Mapping[str, Constraint], what: str) -> None:
    """Check every option of ``table`` that ``config`` holds against its constraint (an option the
    configuration lacks takes its default and is not checked here).

    Raises:
        DDKitError: the first option that breaks its constraint, in one line.
    """
    for name, constraint in table.items():
        value = lookup(config, name, _MISSING)
        if value is not _MISSING:
            constraint(what, name, value)
