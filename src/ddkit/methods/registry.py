"""The method registry: ``ddkit.distill(name, ...)``, the CLI, the bench and the contract tests look
methods up here by name.

Each method is a :class:`MethodSpec`: its entry point and what the rest of ddkit needs to know of
it (family, evaluation protocol, capabilities, preset resolver). Register one with
:func:`register_method` (a decorator) or :func:`register`; docs/extending.md walks through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

from ddkit.errors import DDKitError

FAMILIES = ("matching", "statistics", "baseline", "standalone")
PROTOCOLS = ("hard", "soft")


@dataclass(frozen=True)
class MethodSpec:
    """A registered distillation method.

    Attributes:
        name: the name users type (``ddkit distill NAME``).
        run: the entry point ``run(real, ipc, preset="quick", overrides=None, seed=0, device="cpu",
            show_progress=True, **flags) -> DistilledSet`` (images float32 [K*ipc, C, H, W] in
            [0, 1], labels class-major). ``flags`` are the capabilities' keywords below, and the
            family's own (``terms``/``weights``, ``teacher_paths``/``relabel``).
        family: "matching", "statistics", "baseline" or "standalone" (what it shares with others).
        protocol: the evaluation protocol its sets call for: "hard" labels or "soft" (KD replay).
        resolve: ``resolve(dataset, ipc, preset, overrides=None, **flags) -> dict``, the
            configuration a run with these arguments uses (``flags``: the family's, e.g. the
            matching family's ``terms``/``weights``), for ``ddkit config``, the bench's staleness
            check and the contract tests; or None for a method without options. A resolver that
            takes only ``(dataset, ipc, preset)`` still works where no overrides are given.
        active_options: ``config -> config`` without options the run never reads (compared by the
            bench to decide whether a preset changed), or None (compare everything).
        checkpoints: ``run`` takes ``checkpoint={"dir", "every", "seconds", "resume", "run"}`` and
            a resumed run equals an uninterrupted one.
        compile: ``run`` takes ``compiled=True`` (torch.compile where it helps).
        splits_work: several torchrun processes share the work (each returns its part).
        merges_parts: ``run`` takes ``merge_parts(result)`` to merge the parts before a final stage.
        relabel_baseline: the bench adds ``random+NAME``: the random subset relabelled by this
            method's teachers (the statistics family).
        summary: one line for ``ddkit distill --help``.
    """

    name: str
    run: Callable
    family: str = "standalone"
    protocol: str = "hard"
    resolve: Callable | None = None
    active_options: Callable | None = None
    checkpoints: bool = False
    compile: bool = False
    splits_work: bool = False
    merges_parts: bool = False
    relabel_baseline: bool = False
    summary: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise DDKitError(f"method {self.name!r}: family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.protocol not in PROTOCOLS:
            raise DDKitError(f"method {self.name!r}: protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")


#: name -> spec, in registration order.
SPECS: dict[str, MethodSpec] = {}

#: Function attributes of the registry's first form, read for entry points registered that way.
_LEGACY_ATTRIBUTES = {"supports_checkpoints": "checkpoints", "supports_compile": "compile",
                      "splits_work": "splits_work", "merges_parts": "merges_parts"}


class _EntryPoints(Mapping):
    """``METHODS``: name -> entry point, a read-only view of :data:`SPECS` (the registry's first form)."""

    def __getitem__(self, name):
        return SPECS[name].run

    def __iter__(self):
        return iter(SPECS)

    def __len__(self):
        return len(SPECS)


METHODS = _EntryPoints()


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (a name already taken raises DDKitError); returns it."""
    if spec.name in SPECS:
        raise DDKitError(f"a method named {spec.name!r} is registered already")
    SPECS[spec.name] = spec
    return spec


def register_method(name: str, **fields):
    """Decorator: register ``fn`` as the entry point of method ``name``; ``fields`` are the other
    :class:`MethodSpec` attributes (family, protocol, resolve, capabilities ...).

    The registry's first form, ``@register_method(name)`` on a function carrying
    ``supports_checkpoints``/``supports_compile``/``splits_work``/``merges_parts`` attributes,
    still works: the attributes become the spec's capabilities.
    """

    def decorate(fn):
        legacy = {field: bool(getattr(fn, attribute)) for attribute, field in _LEGACY_ATTRIBUTES.items()
                  if hasattr(fn, attribute) and field not in fields}
        summary = fields.pop("summary", None) or (fn.__doc__ or "").strip().split("\n")[0]
        register(MethodSpec(name=name, run=fn, summary=summary, **legacy, **fields))
        return fn

    return decorate


def unregister(name: str) -> MethodSpec:
    """Remove method ``name`` from the registry (plug-ins and tests); returns its spec."""
    return SPECS.pop(name)


def get_spec(name: str) -> MethodSpec:
    """The spec of method ``name``; an unknown name raises DDKitError listing the known ones."""
    if name not in SPECS:
        raise DDKitError(f"unknown method {name!r}; choose one of: {', '.join(sorted(SPECS))}")
    return SPECS[name]


def get_method(name: str) -> Callable:
    """The entry point of method ``name``; an unknown name raises DDKitError listing the known ones."""
    return get_spec(name).run


def method_names(family: str | None = None, **capabilities) -> list[str]:
    """Registered method names, in registration order; only those of ``family`` and with the given
    capability values when given (``method_names(relabel_baseline=True)``)."""
    return [name for name, spec in SPECS.items() if (family is None or spec.family == family)
            and all(getattr(spec, key) == value for key, value in capabilities.items())]


def describe_methods() -> str:
    """``family: a, b; family: c`` over the registry, for help texts."""
    families = dict.fromkeys(spec.family for spec in SPECS.values())
    return "; ".join(f"{family}: {', '.join(method_names(family))}" for family in families)


