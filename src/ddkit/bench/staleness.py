"""Whether a cell's result still stands: its set may be gone, or made under an older preset
(:func:`preset_changes`: the stored configuration against the one the method's spec resolves now),
or its evaluation made under an older evaluation preset (:func:`evaluation_changes`); and what a
stopped bench left to continue from (:func:`work_in_progress`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import ddkit
from ddkit.api import CHECKPOINT_DIR
from ddkit.bench.cells import BASELINE, Cell, cell_key, relabelled_method
from ddkit.checkpoint import LATEST, read_state
from ddkit.evaluate.protocols import EVAL_CHECKPOINT_DIR, eval_checkpoint_name, evaluation_config, find_stored
from ddkit.methods import get_spec, stats_family
from ddkit.store.distilled import MANIFEST_FILE
from ddkit.utils import plain_data


def _differences(stored, current, prefix: str = "", one_sided: bool = False) -> list[str]:
    """``"key: old -> new"`` for every value that differs between two configs.

    Keys on one side only are not differences unless ``one_sided``: an option added to a preset
    after a set was made carries a default that keeps the old behaviour (``channels_last``, for
    example, changes speed). A preset's ``"auto"`` is met by any stored value: records store what
    ``auto`` resolved to for the set's dataset (relabel's ``crop_padding`` 1 for 8-pixel images).
    """
    if isinstance(stored, dict) and isinstance(current, dict):
        found = []
        for key in stored.keys() & current.keys():
            found += _differences(stored[key], current[key], f"{prefix}{key}.", one_sided)
        if one_sided:
            found += [f"{prefix}{key}: {stored[key]!r} -> (none)" for key in stored.keys() - current.keys()]
            found += [f"{prefix}{key}: (none) -> {current[key]!r}" for key in current.keys() - stored.keys()]
        return sorted(found)
    if stored == current or (current == "auto" and stored is not None):
        return []
    return [f"{prefix.rstrip('.')}: {stored!r} -> {current!r}"]


def _used_relabel_options(options: dict) -> dict:
    """Relabel ``options`` without those the relabel did not use: ``mix_beta`` without mixing (the
    records store None for it then, the preset its unused value)."""
    return {key: value for key, value in options.items() if not (key == "mix_beta" and options.get("mix") == "none")}


def preset_changes(cell: Cell, manifest: dict, tier: str) -> list[str]:
    """How the tier's preset for ``cell`` changed since its set (``manifest``) was made; [] if it did not.

    The matching and statistics methods compare the set's stored configuration with the preset the
    code resolves now. ``random+M`` compares M's teacher models and relabel options (its images are
    the random subset; M's recover options do not touch it). ``random`` has no preset.
    """
    if cell.method == BASELINE:
        return []
    if relabelled_method(cell.method) is not None:
        config = stats_family.resolve_preset(relabelled_method(cell.method), cell.dataset, cell.ipc, tier)
        relabel = manifest.get("relabel") or {}
        stored = {"teachers": [teacher.get("model") for teacher in relabel.get("teacher_info", [])],
                  "relabel": _used_relabel_options(relabel)}
        changes = _differences(stored, plain_data({"teachers": config["teachers"],
                                               "relabel": _used_relabel_options(config["relabel"])}))
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
    return _differences(active(stored), plain_data(active(current)))


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
        changed[arch] = (_differences(earlier[-1].get("config"), plain_data(config), one_sided=True) if earlier else []) \
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
    seed = checkpoint.stem.rsplit("-seed", 1)[-1]
    try:
        state = read_state(checkpoint)
        return f"seed {seed}, epoch {int(state['loop']['next_epoch'])} of {int(state['identity']['config']['epochs'])}"
    except Exception:  # a damaged or foreign file is ignored by the run too; the plan only reports it
        return f"seed {seed}, unreadable"
