"""The cells of a bench grid: one (dataset, method, IPC) each, the checks of a bench request, and
the grid's run order. A cell's evaluation protocol comes from its method's spec
(:class:`ddkit.methods.MethodSpec`); every method whose spec has ``relabel_baseline`` adds the cell
``random+M`` (the random subset relabelled with M's teachers)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ddkit.data.registry import resolve_name
from ddkit.errors import DDKitError
from ddkit.methods import METHODS, get_spec, method_names
from ddkit import tiers
from ddkit.models import available
from ddkit.tiers import TIERS  # noqa: F401  re-exported: the bench's tiers are the presets
from ddkit.utils import split_names


BASELINE = "random"


def statistics_methods() -> tuple[str, ...]:
    """The methods with a relabelled baseline ``random+M`` (their spec's ``relabel_baseline``: the
    statistics family)."""
    return tuple(method_names(relabel_baseline=True))


def relabelled_baseline(method: str) -> str:
    """The name of the cell holding the random subset relabelled with ``method``'s teachers."""
    return f"{BASELINE}+{method}"


def relabelled_method(method: str) -> str | None:
    """``M`` for the relabelled baseline ``random+M``; None for any other name (the one place
    that parses the ``random+M`` spelling)."""
    prefix = BASELINE + "+"
    return method[len(prefix):] if method.startswith(prefix) else None


def is_baseline(method: str) -> bool:
    """True for ``random`` and every ``random+M``."""
    return method == BASELINE or relabelled_method(method) is not None


def protocol_for(method: str) -> str:
    """The evaluation protocol of ``method``'s cells: its spec's (``MethodSpec.protocol``: "soft"
    for the statistics family, "hard" for the others); "soft" for a relabelled baseline."""
    if relabelled_method(method) is not None:
        return "soft"
    return get_spec(method).protocol


def slug(text: str) -> str:
    """A file-name-safe form of a dataset name (``imagefolder:/a/b`` -> ``imagefolder_a_b``)."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.+-]", "_", text)).strip("_.") or "dataset"


def set_name(dataset: str, method: str, ipc: int) -> str:
    """``<dataset>-<method>-ipc<N>``: the folder name of a cell's set under ``sets/``."""
    return f"{slug(dataset)}-{method}-ipc{ipc}"


@dataclass(frozen=True)
class Cell:
    """One (dataset, method, IPC) of the grid; ``protocol`` follows from the method."""

    dataset: str
    method: str
    ipc: int

    @property
    def protocol(self) -> str:
        """"hard" or "soft": the evaluation protocol the cell's method calls for."""
        return protocol_for(self.method)

    @property
    def name(self) -> str:
        """The cell's set folder under ``OUT/sets`` (``fashion-mnist-dm-ipc10``)."""
        return set_name(self.dataset, self.method, self.ipc)


def _as_list(value) -> list:
    """A comma-separated string or an iterable as a list (``"dm,ddm"`` -> ``["dm", "ddm"]``)."""
    if isinstance(value, str):
        return split_names(value)
    if isinstance(value, int):
        return [value]
    return list(value)


def check_tier(tier: str) -> str:
    """``tier`` itself if it is one of :data:`ddkit.tiers.TIERS`; otherwise DDKitError naming the choices."""
    return tiers.check_tier(tier, "tier")


def check_datasets(datasets) -> list[str]:
    """Canonical dataset names; an unknown name raises DDKitError (the data need not be fetched yet)."""
    names = [resolve_name(name)[0] for name in datasets]
    if not names:
        raise DDKitError("no dataset given; pass e.g. --datasets fashion-mnist,mnist")
    return list(dict.fromkeys(names))


def check_methods(methods) -> list[str]:
    """Registered method names (``random+M`` accepted for a statistics method M); unknown -> DDKitError."""
    known, stats = list(METHODS), statistics_methods()
    checked = []
    for method in methods:
        base = relabelled_method(method)
        if base is not None and base not in stats:
            raise DDKitError(f"{method!r}: only statistics methods have a relabelled baseline; "
                             f"choose random+ one of: {', '.join(stats)}")
        if base is None and method not in known:
            raise DDKitError(f"unknown method {method!r}; choose from: {', '.join(known)}")
        checked.append(method)
    return list(dict.fromkeys(checked))


def check_ipcs(ipcs) -> list[int]:
    """The IPC values without repeats, in order; a value below 1 or not an int, or none, -> DDKitError."""
    values = []
    for ipc in ipcs:
        if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
            raise DDKitError(f"IPC values must be positive integers, got {ipc!r}; pass e.g. --ipc 1,10,50")
        values.append(ipc)
    if not values:
        raise DDKitError("no IPC given; pass e.g. --ipc 1,10,50")
    return list(dict.fromkeys(values))


def check_archs(archs) -> list[str]:
    """Registered evaluation architectures without repeats; an unknown name, or none, raises DDKitError."""
    archs = list(dict.fromkeys(archs))
    unknown = [a for a in archs if a not in available()]
    if unknown or not archs:
        raise DDKitError(f"unknown architecture {(unknown or [''])[0]!r}; choose from: {', '.join(available())}")
    return archs


def plan_cells(datasets: list[str], methods: list[str], ipcs: list[int]) -> list[Cell]:
    """The grid in run order: smallest IPC first (every dataset), and per (IPC, dataset) the baselines first.

    ``random`` is always included; every statistics method M adds ``random+M``. IPC-major order
    makes an interrupted bench hold a complete small-IPC table before the costly large-IPC cells.
    """
    stats = statistics_methods()
    ordered = [BASELINE] + [relabelled_baseline(m) for m in methods if m in stats]
    ordered += [m for m in methods if is_baseline(m)] + [m for m in methods if not is_baseline(m)]
    ordered = list(dict.fromkeys(ordered))
    return [Cell(dataset, method, ipc) for ipc in sorted(ipcs) for dataset in datasets for method in ordered]


def cell_key(cell: Cell, tier: str, arch: str, runs: int, seed: int) -> tuple:
    """The :func:`line_key` of the result line of ``cell`` evaluated on ``arch``."""
    return (cell.dataset, cell.method, cell.ipc, tier, arch, runs, seed)
