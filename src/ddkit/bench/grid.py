"""The benchmark grid: distill every (dataset, method, IPC) once, evaluate it, record one line per cell.

A bench directory holds

- ``sets/<dataset>-<method>-ipc<N>/``: the distilled sets (the ordinary set format);
- ``results.jsonl``: one JSON line per finished (cell, architecture), appended and fsync'ed, so a
  crash loses at most the cell that was running;
- ``table.md`` and ``plots/``: rewritten after every cell from ``results.jsonl``;
- ``bench.json``: the parameters of the latest ``run_bench`` call;
- ``.claims/<cell>.lock``: which bench process is running which cell (see below).

Resuming: a cell whose line (same dataset, method, IPC, tier, architecture, runs and seed) is
already in ``results.jsonl`` without an error is skipped; a set already saved is not distilled
again, a distillation that was interrupted continues from its checkpoint (``ddkit.resume``), and
stored evaluations are reused (``ddkit.evaluate(..., reuse=True)``). A failed cell is
recorded with ``"error"`` and tried again on the next run. A cell whose preset changed since its
set was made (:func:`preset_changes`) is not finished: its set is renamed to
``<name>.superseded-<time>`` and the cell is made and evaluated again. A cell whose evaluation
preset changed since its result (:func:`evaluation_changes`) keeps its set and is evaluated again.

Several bench processes may work on one bench directory at once (on one machine, or on a file
system whose ``flock`` locks reach every machine): each claims a cell before it runs it
(:func:`claim_cell`) and passes over cells another running process holds, so they share the grid's
cells between them. A claim is an exclusive ``flock`` on the cell's lock file: it ends with its
process, crash included, so nothing stale is left to clean up.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from ddkit.api import CHECKPOINT_DIR
from ddkit.checkpoint import LATEST
from ddkit.errors import DDKitError
from ddkit.evaluate.protocols import EVAL_CHECKPOINT_DIR, eval_checkpoint_name
from ddkit.store.distilled import MANIFEST_FILE
from ddkit.utils import lock_file

TIERS = ("smoke", "quick", "paper")
BASELINE = "random"
RESULTS_FILE = "results.jsonl"
TABLE_FILE = "table.md"
PLOTS_DIR = "plots"
SETS_DIR = "sets"
SPEC_FILE = "bench.json"
CLAIMS_DIR = ".claims"
#: The fields that name a result line; a new line with the same key replaces an older one.
KEY_FIELDS = ("dataset", "method", "ipc", "tier", "arch", "runs", "seed")


def statistics_methods() -> tuple[str, ...]:
    """The methods with a relabelled baseline ``random+M`` (their spec's ``relabel_baseline``: the
    statistics family)."""
    from ddkit.methods import method_names

    return tuple(method_names(relabel_baseline=True))


def relabelled_baseline(method: str) -> str:
    """The name of the cell holding the random subset relabelled with ``method``'s teachers."""
    return f"{BASELINE}+{method}"


def is_baseline(method: str) -> bool:
    """True for ``random`` and every ``random+M``."""
    return method == BASELINE or method.startswith(BASELINE + "+")


def protocol_for(method: str) -> str:
    """The evaluation protocol of ``method``'s cells: its spec's (``MethodSpec.protocol``: "soft"
    for the statistics family, "hard" for the others); "soft" for a relabelled baseline."""
    from ddkit.methods import get_spec

    if method.startswith(BASELINE + "+"):
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


# ---- input checks ----------------------------------------------------------------------------------
def _as_list(value) -> list:
    """A comma-separated string or an iterable as a list (``"dm,ddm"`` -> ``["dm", "ddm"]``)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, int):
        return [value]
    return list(value)


def check_tier(tier: str) -> str:
    """``tier`` itself if it is one of :data:`TIERS`; otherwise DDKitError naming the choices."""
    if tier not in TIERS:
        raise DDKitError(f"unknown tier {tier!r}; choose one of: {', '.join(TIERS)}")
    return tier


def check_datasets(datasets) -> list[str]:
    """Canonical dataset names; an unknown name raises DDKitError (the data need not be fetched yet)."""
    from ddkit.data.registry import resolve_name

    names = [resolve_name(name)[0] for name in datasets]
    if not names:
        raise DDKitError("no dataset given; pass e.g. --datasets fashion-mnist,mnist")
    return list(dict.fromkeys(names))


def check_methods(methods) -> list[str]:
    """Registered method names (``random+M`` accepted for a statistics method M); unknown -> DDKitError."""
    from ddkit.methods import METHODS

    known, stats = list(METHODS), statistics_methods()
    checked = []
    for method in methods:
        base = method[len(BASELINE) + 1:] if method.startswith(BASELINE + "+") else None
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
    from ddkit.models import available

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


# ---- results.jsonl -----------------------------------------------------------------------------------
def line_key(line: dict) -> tuple:
    """What identifies a result line: its :data:`KEY_FIELDS` (dataset, method, IPC, tier, arch, runs, seed)."""
    return tuple(line.get(name) for name in KEY_FIELDS)


def cell_key(cell: Cell, tier: str, arch: str, runs: int, seed: int) -> tuple:
    """The :func:`line_key` of the result line of ``cell`` evaluated on ``arch``."""
    return (cell.dataset, cell.method, cell.ipc, tier, arch, runs, seed)


def read_results(directory: str | Path) -> list[dict]:
    """Every line of ``results.jsonl`` in file order; a torn or foreign line is skipped."""
    path = Path(directory) / RESULTS_FILE
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict) and all(name in line for name in ("dataset", "method", "ipc")):
            lines.append(line)
    return lines


def latest_results(lines: list[dict]) -> list[dict]:
    """The last line of every key (a retried cell replaces its error line), in first-seen order."""
    latest: dict[tuple, dict] = {}
    for line in lines:
        latest[line_key(line)] = line
    return list(latest.values())


def append_result(directory: str | Path, line: dict) -> None:
    """Append one JSON line, flushed and fsync'ed; a torn last line is closed off first."""
    path = Path(directory) / RESULTS_FILE
    text = json.dumps(line, sort_keys=False) + "\n"
    with open(path, "a+b") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                text = "\n" + text
        handle.write(text.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


# ---- one cell ------------------------------------------------------------------------------------------
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _reset_peak_memory(device) -> None:
    """Best effort: restart the peak-memory counter so a cell's peak is its own, not the process's.

    On Linux, writing 5 to ``/proc/self/clear_refs`` resets the resident-set high-water mark that
    ``ru_maxrss`` reports; elsewhere the peak stays the process's maximum so far.
    """
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _stored_seed(manifest: dict):
    seeds = manifest.get("seeds") or {}
    return seeds.get("run", seeds.get("selection"))


def _load_existing(path: Path, cell: Cell, tier: str, seed: int):
    """The set saved at ``path`` if there is one (refusing a set made for another tier or seed)."""
    import ddkit

    if not (path / "manifest.json").is_file():
        return None
    distilled = ddkit.load(path)
    stored_seed = _stored_seed(distilled.meta)
    if stored_seed is not None and stored_seed != seed:
        raise DDKitError(f"{path} was made with seed {stored_seed}, this bench asks for seed {seed}; "
                         "use another --out")
    made_at = (distilled.meta.get("relabelled_like") or {}).get("preset", distilled.meta.get("preset"))
    if cell.method != BASELINE and made_at is not None and made_at != tier:
        raise DDKitError(f"{path} was made at tier {made_at}, this bench asks for {tier}; use another --out")
    status = distilled.meta.get("status", "complete")
    if status != "complete":
        raise DDKitError(f"{path} is not complete ({status}); remove it to distill again")
    changes = preset_changes(cell, distilled.meta, tier)
    if changes:
        _set_aside(path, changes)
        return None
    return distilled


def _plain(value):
    """``value`` as JSON would store it (tuples become lists), so presets compare with manifests."""
    return json.loads(json.dumps(value))


def _differences(stored, current, prefix: str = "", one_sided: bool = False) -> list[str]:
    """``"key: old -> new"`` for every value that differs between two configs.

    Keys on one side only are not differences unless ``one_sided``: an option added to a preset
    after a set was made carries a default that keeps the old behaviour (``channels_last``, for
    example, changes speed).
    """
    if isinstance(stored, dict) and isinstance(current, dict):
        found = []
        for key in stored.keys() & current.keys():
            found += _differences(stored[key], current[key], f"{prefix}{key}.", one_sided)
        if one_sided:
            found += [f"{prefix}{key}: {stored[key]!r} -> (none)" for key in stored.keys() - current.keys()]
            found += [f"{prefix}{key}: (none) -> {current[key]!r}" for key in current.keys() - stored.keys()]
        return sorted(found)
    return [] if stored == current else [f"{prefix.rstrip('.')}: {stored!r} -> {current!r}"]


def preset_changes(cell: Cell, manifest: dict, tier: str) -> list[str]:
    """How the tier's preset for ``cell`` changed since its set (``manifest``) was made; [] if it did not.

    The matching and statistics methods compare the set's stored configuration with the preset the
    code resolves now. ``random+M`` compares M's teacher models and relabel options (its images are
    the random subset; M's recover options do not touch it). ``random`` has no preset.
    """
    from ddkit.methods import get_spec, stats_family

    if cell.method == BASELINE:
        return []
    if cell.method.startswith(BASELINE + "+"):
        config = stats_family.resolve_preset(cell.method[len(BASELINE) + 1:], cell.dataset, tier)
        relabel = manifest.get("relabel") or {}
        stored = {"teachers": [teacher.get("model") for teacher in relabel.get("teacher_info", [])],
                  "relabel": relabel}
        changes = _differences(stored, _plain({"teachers": config["teachers"], "relabel": config["relabel"]}))
        # a teacher's cache key holds its training recipe: new teachers make new soft labels
        keys = [teacher.get("key") for teacher in relabel.get("teacher_info", [])]
        if keys and None not in keys:
            wanted = stats_family.teacher_keys(config, cell.dataset, int(relabel.get("seed", 0)))
            changes += [f"teachers: {keys} -> {wanted}"] if keys != wanted else []
        return changes
    spec = get_spec(cell.method)
    if spec.resolve is None:
        return []
    stored = manifest.get("config") or {}
    current = spec.resolve(cell.dataset, cell.ipc, tier)
    active = spec.active_options or (lambda config: config)
    return _differences(active(stored), _plain(active(current)))


def reasons_to_remake(cell: Cell, sets: Path, tier: str) -> list[str]:
    """Why a cell with a result line must be made again: its set is gone (deleted, or set aside and
    not yet remade when a bench was stopped) or its preset changed since; [] when it stands."""
    manifest_path = sets / cell.name / MANIFEST_FILE
    if not manifest_path.is_file():
        return [f"its set {manifest_path.parent} is gone"]
    return preset_changes(cell, json.loads(manifest_path.read_text()), tier)


def evaluation_changes(cell: Cell, sets: Path, tier: str, archs: list[str], runs: int, seed: int) -> dict[str, list[str]]:
    """Architectures whose stored evaluation of the cell's set no longer matches the tier's
    evaluation preset, each with how its options changed (e.g. ``["epochs: 300 -> 200"]``).

    A finished cell stands only if its set holds a finished evaluation with the options the code
    resolves now and the bench's seeds, the same match ``ddkit.evaluate(..., reuse=True)`` makes;
    otherwise the bench evaluates it again (the set itself is kept). Call it for a cell whose set
    exists (see :func:`reasons_to_remake`).
    """
    import ddkit
    from ddkit.evaluate.protocols import evaluation_config, find_stored

    distilled = ddkit.load(sets / cell.name)
    config = evaluation_config(distilled, cell.protocol, tier)
    seeds = [seed + r for r in range(runs)]
    changed = {}
    for arch in archs:
        if find_stored(distilled, cell.protocol, tier, arch, config, seeds) is not None:
            continue
        earlier = [rec for rec in distilled.meta.get("evaluations", [])
                   if not rec.get("partial") and (rec.get("protocol"), rec.get("preset"), rec.get("arch"),
                                                  rec.get("seeds")) == (cell.protocol, tier, arch, seeds)]
        changed[arch] = (_differences(earlier[-1].get("config"), _plain(config), one_sided=True) if earlier else []) \
            or ["the set holds no finished evaluation with these seeds"]
    return changed


def trusted_unchecked(cell: Cell, sets: Path, tier: str, archs: list[str], trust_results: bool) -> bool:
    """True when ``trust_results`` is asked for and the cell's set cannot check its result lines.

    That is when the set is missing: the lines came without their sets (e.g. a ``results.jsonl``
    carried to another machine), so they stand with nothing to check them against. It is also
    when the cell is the ``random`` baseline and its set holds no evaluation for ``tier`` and
    ``archs``, finished, partial or stopped: a ``random+M`` cell made that set again here, and a
    random subset depends on dataset, IPC and seed alone, so it is the set the lines measured.
    A set the cell itself has begun to evaluate is checked as usual."""
    if not trust_results:
        return False
    path = sets / cell.name
    if not (path / MANIFEST_FILE).is_file():
        return True
    return cell.method == BASELINE and not _evaluation_begun(path, cell.protocol, tier, archs)


def _evaluation_begun(path: Path, protocol: str, tier: str, archs: list[str]) -> bool:
    """Whether the set at ``path`` holds an evaluation record (finished or partial) or a stopped
    evaluation run for ``protocol`` at ``tier`` on any of ``archs`` (read from disk, nothing loaded)."""
    return any(_evaluation_records(path, protocol, tier, arch) or _stopped_runs(path, protocol, tier, arch)
               for arch in archs)


def _evaluation_records(path: Path, protocol: str, tier: str, arch: str) -> list[dict]:
    """The evaluation records (finished and partial) in the manifest of the set at ``path`` for
    ``protocol`` at ``tier`` on ``arch``; [] without a manifest."""
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        return []
    return [rec for rec in json.loads(manifest.read_text()).get("evaluations", [])
            if (rec.get("protocol"), rec.get("preset"), rec.get("arch")) == (protocol, tier, arch)]


def _stopped_runs(path: Path, protocol: str, tier: str, arch: str) -> list[Path]:
    """The epoch checkpoints of stopped evaluation runs in the set at ``path``, sorted."""
    return sorted((path / EVAL_CHECKPOINT_DIR).glob(eval_checkpoint_name(protocol, tier, arch, "*")))


def line_changes(line: dict, sets: Path, trust_results: bool = False) -> list[str]:
    """Why a result line no longer counts as finished: its set must be made again
    (:func:`reasons_to_remake`) or its evaluation no longer matches the tier's evaluation preset
    (:func:`evaluation_changes`); [] when it stands (always, for a line :func:`trusted_unchecked`
    trusts under ``trust_results``)."""
    cell = Cell(line["dataset"], line["method"], line["ipc"])
    if trusted_unchecked(cell, sets, line["tier"], [line["arch"]], trust_results):
        return []
    return reasons_to_remake(cell, sets, line["tier"]) or evaluation_changes(
        cell, sets, line["tier"], [line["arch"]], line["runs"], line["seed"]).get(line["arch"], [])


@dataclass
class CellStatus:
    """Where one (cell, architecture) of a bench stands.

    Attributes:
        state: "done" (a result line that stands), "to run" (no line yet), "failed" (its last
            line is an error; tried again), "make again" (its set is gone or was made under an
            older preset) or "evaluate again" (its evaluation was made under an older evaluation
            preset).
        reasons: why, for the last three states (e.g. ``["epochs: 300 -> 200"]``).
        line: its latest result line, if any.
    """

    cell: Cell
    arch: str
    state: str
    reasons: list[str]
    line: dict | None = None


def latest_by_key(directory: str | Path) -> dict[tuple, dict]:
    """The latest result line of every :func:`line_key` in the bench directory's results."""
    return {line_key(line): line for line in latest_results(read_results(directory))}


def cell_status(cell: Cell, sets: Path, tier: str, archs: list[str], runs: int, seed: int,
                latest: dict[tuple, dict], trust_results: bool = False) -> list[CellStatus]:
    """The status of ``cell`` for each of ``archs``; ``latest`` maps :func:`line_key` to the latest
    result line. A cell whose lines all stand is checked against the presets (set, then evaluation).

    With ``trust_results``, a cell whose lines all stand but whose set is missing counts as done, and
    so does a ``random`` cell whose set a ``random+M`` cell made again (:func:`trusted_unchecked`).
    Any other cell whose set is there is checked as usual."""
    statuses = []
    for arch in archs:
        line = latest.get(cell_key(cell, tier, arch, runs, seed))
        if line is None:
            statuses.append(CellStatus(cell, arch, "to run", [], None))
        elif "error" in line:
            statuses.append(CellStatus(cell, arch, "failed", [str(line["error"]).splitlines()[0]], line))
        else:
            statuses.append(CellStatus(cell, arch, "done", [], line))
    if any(status.state != "done" for status in statuses):
        return statuses
    if trusted_unchecked(cell, sets, tier, archs, trust_results):
        return statuses
    remake = reasons_to_remake(cell, sets, tier)
    if remake:
        return [CellStatus(cell, s.arch, "make again", remake, s.line) for s in statuses]
    changed = evaluation_changes(cell, sets, tier, archs, runs, seed)
    return [CellStatus(cell, s.arch, "evaluate again", changed[s.arch], s.line) if s.arch in changed else s
            for s in statuses]


def work_in_progress(cell: Cell, sets: Path, tier: str, arch: str, runs: int, seed: int) -> list[str]:
    """What a stopped bench left of ``cell`` to continue from (read from disk, nothing loaded):
    an interrupted distillation, evaluation runs already stored, a stopped evaluation run."""
    path = sets / cell.name
    found = []
    if (path / CHECKPOINT_DIR / LATEST).is_file():
        found.append("an interrupted distillation")
    seeds = set(range(seed, seed + runs))
    stored = set()
    for rec in _evaluation_records(path, cell.protocol, tier, arch):
        if rec.get("partial") and set(rec.get("seeds", [])) <= seeds:
            stored |= set(rec["seeds"])
    if stored:
        found.append(f"{len(stored)} of {runs} evaluation runs stored")
    for checkpoint in _stopped_runs(path, cell.protocol, tier, arch):
        found.append(f"a stopped evaluation run ({_stopped_at(checkpoint)})")
    return found


def _stopped_at(checkpoint: Path) -> str:
    """``"seed 1, epoch 182 of 300"`` for an evaluation run's epoch checkpoint (what it can say)."""
    from ddkit.checkpoint import read_state

    seed = checkpoint.stem.rsplit("-seed", 1)[-1]
    try:
        state = read_state(checkpoint)
        return f"seed {seed}, epoch {int(state['loop']['next_epoch'])} of {int(state['identity']['config']['epochs'])}"
    except Exception:  # a damaged or foreign file is ignored by the run too; the plan only reports it
        return f"seed {seed}, unreadable"


def check_bench_request(tier, datasets, methods, ipcs, archs, runs, out, seed=0):
    """The checked ``(tier, datasets, methods, ipcs, archs, out)`` of a bench request, the same for
    ``run_bench`` and ``--plan``; one-line DDKitError for anything a run would refuse."""
    tier = check_tier(tier)
    datasets, methods = check_datasets(_as_list(datasets)), check_methods(_as_list(methods))
    ipcs, archs = check_ipcs(_as_list(ipcs)), check_archs(_as_list(archs))
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise DDKitError(f"runs must be a positive integer, got {runs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DDKitError(f"seed must be an integer >= 0, got {seed!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DDKitError(f"{out} exists and is not a directory; choose another --out")
    if (out / "manifest.json").is_file():
        raise DDKitError(f"{out} is a distilled set, not a bench directory; choose another --out")
    return tier, datasets, methods, ipcs, archs, out


def plan_bench(tier: str, datasets, methods, ipcs, runs: int, out, seed: int = 0, archs=("convnet",),
               trust_results: bool = False) -> list[str]:
    """What ``run_bench`` with these arguments would do, one line per (cell, architecture), without
    running or writing anything; the last line counts the states."""
    tier, datasets, methods, ipcs, archs, out = check_bench_request(tier, datasets, methods, ipcs, archs, runs, out, seed)
    latest = latest_by_key(out)
    cells = plan_cells(datasets, methods, ipcs)
    report, counts = [], {}
    for number, cell in enumerate(cells, 1):
        statuses = cell_status(cell, out / SETS_DIR, tier, archs, runs, seed, latest, trust_results)
        held = cell_held_elsewhere(out, cell) if any(s.state != "done" for s in statuses) else None
        for status in statuses:
            counts[status.state] = counts.get(status.state, 0) + 1
            text = f"[{number}/{len(cells)}] {cell.dataset} {cell.method} ipc {cell.ipc} ({cell.protocol}, {status.arch}): "
            if status.state == "done":
                text += f"done, {status.line['mean']:.2f} +- {status.line['std']:.2f}"
            else:
                text += status.state + (f" ({_shown(status.reasons)})" if status.reasons else "")
                left = work_in_progress(cell, out / SETS_DIR, tier, status.arch, runs, seed)
                if left:
                    text += "; continues from " + ", ".join(left)
                if held is not None:
                    text += f"; a bench process is running it now ({held.describe()})"
            report.append(text)
    report.append(", ".join(f"{counts[state]} {state}" for state in
                            ("done", "to run", "failed", "make again", "evaluate again") if state in counts))
    return report


class CellClaim:
    """This process's hold on one cell of a bench directory (see the module docstring).

    Attributes:
        held: True when this process holds the cell; False when another running process does.
        holder: the holding process's ``{"pid", "host", "since"}`` where ``held`` is False (as it
            wrote it; empty if unreadable).
    """

    def __init__(self, out: Path, cell: Cell):
        folder = Path(out) / CLAIMS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{cell.name}.lock"  # never deleted (see lock_file)
        self._fd = lock_file(path, wait=False)
        self.held = self._fd is not None
        self.holder: dict = {}
        if not self.held:
            try:
                self.holder = json.loads(path.read_text(encoding="utf-8") or "{}")
            except (OSError, ValueError, UnicodeDecodeError):
                pass
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                        "since": _now()}).encode("utf-8"), 0)

    def release(self) -> None:
        """End the claim (closing the file drops the lock); safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "CellClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def describe(self) -> str:
        """``"pid 123 on host, since ..."`` of the process holding the cell."""
        holder = self.holder
        return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
                if holder else "another process")


def claim_cell(out: str | Path, cell: Cell) -> CellClaim:
    """Try to claim ``cell`` of the bench directory ``out`` for this process, without waiting.

    Returns a :class:`CellClaim`; its ``held`` says whether the claim succeeded. Use it as a context
    manager (or call ``release``) to end the claim; a process that ends drops its claims anyway.
    """
    return CellClaim(Path(out), cell)


def cell_held_elsewhere(out: str | Path, cell: Cell) -> CellClaim | None:
    """The claim of another running process on ``cell`` (for ``--plan``), or None if none holds it."""
    if not (Path(out) / CLAIMS_DIR / f"{cell.name}.lock").exists():
        return None
    try:
        with claim_cell(out, cell) as claim:
            return None if claim.held else claim
    except OSError:  # a bench directory this user may read but not write: nobody's claim can be seen
        return None


def _shown(changes: list[str]) -> str:
    return "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")


def _set_aside(path: Path, changes: list[str]) -> Path:
    """Rename a superseded set to ``<name>.superseded-<UTC time>`` (kept, never deleted) and say why."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.superseded-{stamp}")
    path.rename(target)
    print(f"{path.name}: the preset changed since this set was made ({_shown(changes)}); making it again "
          f"(the old set is kept in {target})", file=sys.stderr, flush=True)
    return target


def _peak_memory(manifest: dict):
    """The set's recorded peak memory in bytes, or None where none was recorded (older sets wrote ``{}``)."""
    peak = manifest.get("peak_memory_bytes")
    return peak if isinstance(peak, (int, float)) and not isinstance(peak, bool) else None


def _distilled_set(cell: Cell, sets: Path, tier: str, seed: int, device, show_progress: bool,
                   compiled: bool = False):
    """Load the cell's set, or make and save it (``compiled``: through torch.compile, see
    :func:`ddkit.distill`); returns the DistilledSet (saved, ``path`` set)."""
    import ddkit

    path = sets / cell.name
    existing = _load_existing(path, cell, tier, seed)
    if existing is not None:
        return existing
    if not cell.method.startswith(BASELINE + "+"):
        _reset_peak_memory(device)
        if (path / CHECKPOINT_DIR / LATEST).is_file():  # an interrupted bench: continue that distillation
            ddkit.resume(path, device=device, show_progress=show_progress, compiled=compiled)
        else:
            ddkit.distill(cell.method, dataset=cell.dataset, ipc=cell.ipc, preset=tier, seed=seed, device=device,
                          show_progress=show_progress, out=path, compiled=compiled)
        return ddkit.load(path)
    # random+M: the random subset of this cell, relabelled with M's teachers and relabel options.
    method = cell.method[len(BASELINE) + 1:]
    base = _distilled_set(Cell(cell.dataset, BASELINE, cell.ipc), sets, tier, seed, device, show_progress, compiled)
    return _relabel_random(base, method, path, tier, seed, device, show_progress, compiled)


def _relabel_random(base, method: str, path: Path, tier: str, seed: int, device, show_progress: bool,
                    compiled: bool = False):
    """Save ``base`` relabelled like ``method`` at ``tier`` to ``path`` and return it (``compiled``:
    teachers not cached yet train through torch.compile)."""
    from ddkit.data import load_dataset
    from ddkit.methods import stats_family
    from ddkit.utils import peak_memory_bytes

    _reset_peak_memory(device)
    real = load_dataset(base.dataset, **base.meta.get("dataset_options", {}))
    config = stats_family.resolve_preset(method, real.name, tier, real=real)
    started = time.perf_counter()
    teachers = stats_family.method_teachers(real, config, seed, device, show_progress, compiled=compiled)
    squeezed = time.perf_counter()
    result = stats_family.relabel_with(base, teachers, config, seed, device, show_progress)
    finished = time.perf_counter()
    timings = result.meta.setdefault("timings", {})
    made = float(timings.get("distill_seconds") or 0.0)
    timings["squeeze_seconds"] = round(squeezed - started, 3)
    timings["relabel_seconds"] = round(finished - squeezed, 3)
    # The time to make this set: the random selection, the teachers (cached ones load fast), the relabel.
    timings["distill_seconds"] = round(made + finished - started, 3)
    result.meta["relabelled_like"] = {"method": method, "preset": tier}
    result.meta["peak_memory_bytes"] = peak_memory_bytes(device)
    result.save(path)
    return result


#: Manifest fields that, with the data file, decide what an evaluation of a set computes.
TWIN_FIELDS = ("dataset", "dataset_options", "normalization", "decode")


def adopt_twin_evaluations(distilled, cell: Cell, sets: Path, tier: str, archs: list[str], runs: int, seed: int,
                           device, compiled: bool = False) -> dict[str, str]:
    """Copy into ``distilled``'s manifest the finished evaluations of a byte-identical set.

    Two cells can hold the same set: ``random+sre2l`` and ``random+cda`` relabel the same random
    subset with the same teachers and relabel options. An evaluation is a function of the data
    file, the manifest's dataset, normalisation and decoding, the resolved options, the seeds,
    the device and whether it was compiled, so a set of ``sets`` that agrees on all of these has
    already computed this one:
    its record is copied (with ``"reused_from"``) instead of training the same networks again.

    Returns:
        {arch: the twin set's folder name} for every architecture adopted.
    """
    from ddkit.evaluate.protocols import evaluation_config, finished_record, find_stored
    from ddkit.store.distilled import DATA_FILE

    if distilled.path is None:
        return {}
    own = json.loads((distilled.path / MANIFEST_FILE).read_text())
    config = evaluation_config(distilled, cell.protocol, tier)
    seeds = [seed + r for r in range(runs)]
    wanted = [arch for arch in archs if find_stored(distilled, cell.protocol, tier, arch, config, seeds) is None]
    adopted = {}
    for other in sorted(sets.glob(f"*/{MANIFEST_FILE}")):
        if not wanted or other.parent == distilled.path or ".superseded-" in other.parent.name:
            continue
        manifest = json.loads(other.read_text())
        if (manifest.get("sha256") or {}).get(DATA_FILE) != (own.get("sha256") or {}).get(DATA_FILE) or any(
                manifest.get(field) != own.get(field) for field in TWIN_FIELDS):
            continue
        for arch in list(wanted):
            rec = finished_record(manifest.get("evaluations", []), cell.protocol, tier, arch, config, seeds)
            if rec is not None and rec.get("device") == str(device) and bool(rec.get("compiled")) == compiled:
                distilled.record_evaluation(dict(rec, reused_from=other.parent.name))
                adopted[arch] = other.parent.name
                wanted.remove(arch)
    return adopted


def run_cell(cell: Cell, out: Path, tier: str, runs: int, seed: int, device, archs: list[str],
             show_progress: bool, compiled: bool = False) -> list[dict]:
    """Distill (or load) and evaluate one cell; returns one result line per architecture
    (``compiled``: distillation and evaluation networks run through ``torch.compile``). A line's
    ``machine`` names the device (:func:`ddkit.utils.describe_device`: the GPU model, or the CPU)."""
    import ddkit
    from ddkit.utils import describe_device

    distilled = _distilled_set(cell, out / SETS_DIR, tier, seed, device, show_progress, compiled)
    twins = adopt_twin_evaluations(distilled, cell, out / SETS_DIR, tier, archs, runs, seed, device, compiled)
    for arch, twin in twins.items():
        if show_progress:
            print(f"{cell.name}: the same set as {twin}, whose {arch} evaluation is reused", file=sys.stderr,
                  flush=True)
    manifest = distilled.meta
    sizes = distilled.stored_bytes()
    machine = describe_device(device)  # timings are only comparable on one machine: say which
    lines = []
    for arch in archs:
        result = ddkit.evaluate(distilled, protocol=cell.protocol, preset=tier, runs=runs, archs=[arch], seed=seed,
                                device=device, show_progress=show_progress, reuse=True, compiled=compiled)[arch]
        lines.append({
            "dataset": cell.dataset, "method": cell.method, "ipc": cell.ipc, "tier": tier,
            "protocol": cell.protocol, "arch": arch, "runs": runs, "seed": seed,
            "accuracies": [round(float(a), 4) for a in result.accuracies],
            "mean": round(result.mean, 4), "std": round(result.std, 4),
            "distill_seconds": (manifest.get("timings") or {}).get("distill_seconds"),
            "eval_seconds_per_run": round(float(result.seconds_per_run), 2),
            "peak_memory_bytes": _peak_memory(manifest),
            "image_bytes": sizes["images"], "soft_label_bytes": sizes["soft_labels"],
            "set": f"{SETS_DIR}/{cell.name}", "date": _now(), "device": str(device),
            "machine": machine,
        })
        if result.compiled:
            lines[-1]["compiled"] = True
        if manifest.get("compiled"):
            lines[-1]["distill_compiled"] = True
        if arch in twins:
            lines[-1]["evaluation_reused_from"] = f"{SETS_DIR}/{twins[arch]}"
    return lines


def _error_line(cell: Cell, arch: str, tier: str, runs: int, seed: int, device, exc: BaseException) -> dict:
    line = {"dataset": cell.dataset, "method": cell.method, "ipc": cell.ipc, "tier": tier,
            "protocol": cell.protocol, "arch": arch, "runs": runs, "seed": seed,
            "error": str(exc) if isinstance(exc, DDKitError) else f"{type(exc).__name__}: {exc}",
            "set": f"{SETS_DIR}/{cell.name}", "date": _now(), "device": str(device)}
    if not isinstance(exc, DDKitError):
        line["traceback"] = "".join(traceback.format_exception(exc))[-4000:]
    return line


# ---- the grid ------------------------------------------------------------------------------------------
def run_bench(tier: str, datasets, methods, ipcs, runs: int, out, seed: int = 0, device: str = "cpu",
              show_progress: bool = True, archs=("convnet",), compiled: bool = False,
              trust_results: bool = False) -> list[dict]:
    """Run (or resume) the grid of (dataset, method, IPC) cells into the bench directory ``out``.

    Args:
        tier: "smoke" | "quick" | "paper": the distillation preset and the evaluation preset.
        datasets: dataset names; methods: method names (``random`` is always added, and
            ``random+M`` for every statistics method M); ipcs: images per class.
        runs: evaluation runs per cell and architecture (seeds ``seed`` .. ``seed + runs - 1``).
        out: the bench directory (created if needed).
        seed: the distillation seed and the first evaluation seed.
        archs: evaluation (student) architectures.
        compiled: train the evaluation networks through ``torch.compile`` (see
            :func:`ddkit.evaluate`), and distill through it too (:func:`ddkit.distill`); an
            execution detail, so cells finished without it stay finished. Result lines of compiled
            evaluations say ``"compiled": true``, as do the manifests of compiled distillations.

    Returns:
        The latest result line of every cell of this grid (failed cells carry ``"error"``), in
        grid order.

    Raises:
        DDKitError: bad input (unknown tier, dataset, method or architecture; a bad IPC or runs),
            or a dataset with cells to run that is not fetched yet (before any cell runs).
    """
    from ddkit.bench.plots import write_plots
    from ddkit.bench.table import write_table
    from ddkit.utils import resolve_device, write_json_atomic

    tier, datasets, methods, ipcs, archs, out = check_bench_request(tier, datasets, methods, ipcs, archs, runs, out, seed)
    device = resolve_device(device)
    if compiled:
        from ddkit.models.training import check_compile_available

        check_compile_available(device)
    cells = plan_cells(datasets, methods, ipcs)
    latest = latest_by_key(out)
    # A cell's status depends on its own set and result lines only, which no other cell touches.
    statuses_of = [cell_status(cell, out / SETS_DIR, tier, archs, runs, seed, latest, trust_results)
                   for cell in cells]
    # A dataset that is not fetched, or an IPC above its smallest class, would fail each of its cells,
    # perhaps hours in: refuse at once (writing nothing), unless all its cells are done already.
    from ddkit.data import check_available, load_dataset
    from ddkit.data.sampling import check_ipc

    for dataset in datasets:
        pending = [cell.ipc for cell, statuses in zip(cells, statuses_of) if cell.dataset == dataset
                   and any(status.state != "done" for status in statuses)]
        if pending:
            check_available(dataset)
            if not dataset.lower().startswith("imagefolder:"):  # those are decoded by the cells only
                check_ipc(load_dataset(dataset), max(pending))
    (out / SETS_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / SPEC_FILE, {"tier": tier, "datasets": datasets, "methods": methods, "ipcs": ipcs,
                                        "runs": runs, "seed": seed, "archs": archs, "device": str(device),
                                        "compiled": compiled,
                                        "cells": len(cells), "started": _now()})

    def say(text):
        if show_progress:
            # In a log file the progress bars end in carriage returns, not newlines: start a new line
            # so that every cell's line can be found with grep.
            print(("" if sys.stderr.isatty() else "\n") + text, file=sys.stderr, flush=True)

    def run_claimed(number: int, cell: Cell, statuses: list[CellStatus], last_try: bool) -> bool:
        """Run ``cell`` if it has work left and this process can claim it (and its random subset,
        which a ``random+M`` cell may have to make); False when another process holds either."""
        label = f"[{number}/{len(cells)}] {cell.dataset} {cell.method} ipc {cell.ipc} ({cell.protocol})"
        if all(status.state == "done" for status in statuses):
            say(f"{label}: done before, skipped")
            return True
        needs = [cell] + ([Cell(cell.dataset, BASELINE, cell.ipc)] if cell.method.startswith(BASELINE + "+") else [])
        claims = []
        try:
            for needed in needs:
                claims.append(claim_cell(out, needed))
                if not claims[-1].held:
                    what = "it" if needed is cell else f"its random subset ({needed.name})"
                    say(f"{label}: another bench process is running {what} ({claims[-1].describe()}); "
                        + ("left to it" if last_try else "coming back to it at the end"))
                    return False
            # Another process may have finished the cell since this one read the results.
            statuses = cell_status(cell, out / SETS_DIR, tier, archs, runs, seed, latest_by_key(out), trust_results)
            for status in statuses:
                if status.state == "evaluate again":
                    say(f"{label}: {status.arch}: the evaluation preset changed since its result "
                        f"({_shown(status.reasons)}); evaluating it again")
            pending = [status.arch for status in statuses if status.state != "done"]
            if not pending:
                say(f"{label}: done by another bench process, skipped")
                return True
            started = time.perf_counter()
            try:
                lines = run_cell(cell, out, tier, runs, seed, device, pending, show_progress, compiled)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # a failing cell is recorded; the bench goes on
                lines = [_error_line(cell, arch, tier, runs, seed, device, exc) for arch in pending]
            for line in lines:
                append_result(out, line)
        finally:
            for claim in claims:
                claim.release()
        summary = "; ".join(f"{line['arch']} {line['mean']:.2f} +- {line['std']:.2f}" if "error" not in line
                            else f"{line['arch']} FAILED: {line['error'].splitlines()[0]}" for line in lines)
        say(f"{label}: {summary} ({time.perf_counter() - started:.0f} s)")
        write_table(out)
        write_plots(out)
        return True

    deferred = []
    for number, (cell, statuses) in enumerate(zip(cells, statuses_of), 1):
        if not run_claimed(number, cell, statuses, last_try=False):
            deferred.append((number, cell, statuses))
    # Cells another process held: once more, in case it stopped or was only looking (--plan);
    # run_claimed reads the results again once it holds one.
    for number, cell, statuses in deferred:
        run_claimed(number, cell, statuses, last_try=True)
    if not (out / TABLE_FILE).exists():
        write_table(out)
        write_plots(out)
    order = {cell_key(cell, tier, arch, runs, seed): index
             for index, (cell, arch) in enumerate((c, a) for c in cells for a in archs)}
    lines = [line for line in latest_results(read_results(out)) if line_key(line) in order]
    return sorted(lines, key=lambda line: order[line_key(line)])
