"""The bench runner: distill (or load, or continue) and evaluate every cell of a grid, record one
result line per (cell, architecture), and rewrite the table and plots after each cell
(:func:`run_bench`); :func:`plan_bench` says what it would do. See :mod:`ddkit.bench.grid` for the
layout of a bench directory and how a bench resumes."""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
import traceback
from pathlib import Path

import torch

import ddkit
from ddkit.api import CHECKPOINT_DIR, relabel
from ddkit.bench.cells import (
    BASELINE, Cell, _as_list, cell_key, check_archs, check_datasets, check_ipcs, check_methods, check_tier,
    plan_cells, relabelled_method,
)
from ddkit.bench.claims import cell_held_elsewhere, claim_cell
from ddkit.bench.plots import write_plots
from ddkit.bench.scores import add_score_inputs, line_scores, needs_score_inputs
from ddkit.bench.results import (
    utc_now, append_result, latest_by_key, latest_results, line_key, read_results, SETS_DIR, SPEC_FILE,
    TABLE_FILE,
)
from ddkit.bench.staleness import cell_status, CellStatus, preset_changes, work_in_progress
from ddkit.bench.table import accuracy_text, write_table
from ddkit.checkpoint import LATEST
from ddkit.data import check_available, load_dataset
from ddkit.data.sampling import check_ipc
from ddkit.errors import DDKitError
from ddkit.evaluate.protocols import evaluation_config, find_stored, finished_record
from ddkit.models.training import check_compile_available
from ddkit.store.distilled import DATA_FILE, MANIFEST_FILE
from ddkit.utils import describe_device, peak_memory_bytes, resolve_device, write_json_atomic


def _reset_peak_memory(device) -> None:
    """Best effort: restart the peak-memory counter so a cell's peak is its own, not the process's.

    On Linux, writing 5 to ``/proc/self/clear_refs`` resets the resident-set high-water mark that
    ``ru_maxrss`` reports; elsewhere the peak stays the process's maximum so far.
    """
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
    if not (path / MANIFEST_FILE).is_file():
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
    if (out / MANIFEST_FILE).is_file():
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
                text += f"done, {accuracy_text(status.line)}"
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
    path = sets / cell.name
    existing = _load_existing(path, cell, tier, seed)
    if existing is not None:
        return existing
    if relabelled_method(cell.method) is None:
        _reset_peak_memory(device)
        if (path / CHECKPOINT_DIR / LATEST).is_file():  # an interrupted bench: continue that distillation
            ddkit.resume(path, device=device, show_progress=show_progress, compiled=compiled)
        else:
            ddkit.distill(cell.method, dataset=cell.dataset, ipc=cell.ipc, preset=tier, seed=seed, device=device,
                          show_progress=show_progress, out=path, compiled=compiled)
        return ddkit.load(path)
    # random+M: the random subset of this cell, relabelled with M's teachers and relabel options.
    method = relabelled_method(cell.method)
    base = _distilled_set(Cell(cell.dataset, BASELINE, cell.ipc), sets, tier, seed, device, show_progress, compiled)
    return _relabel_random(base, method, path, tier, seed, device, show_progress, compiled)


def _relabel_random(base, method: str, path: Path, tier: str, seed: int, device, show_progress: bool,
                    compiled: bool = False):
    """Save ``base`` relabelled like ``method`` at ``tier`` to ``path`` and return it (``compiled``:
    teachers not cached yet train through torch.compile)."""
    _reset_peak_memory(device)
    made = float((base.meta.get("timings") or {}).get("distill_seconds") or 0.0)
    result = relabel(base, method, preset=tier, seed=seed, device=device, show_progress=show_progress,
                     compiled=compiled)
    timings = result.meta["timings"]
    # The time to make this set: the random selection, the teachers (cached ones load fast), the relabel.
    timings["distill_seconds"] = round(made + timings["squeeze_seconds"] + timings["relabel_seconds"], 3)
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
            "set": f"{SETS_DIR}/{cell.name}", "date": utc_now(), "device": str(device),
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
            "set": f"{SETS_DIR}/{cell.name}", "date": utc_now(), "device": str(device)}
    if not isinstance(exc, DDKitError):
        line["traceback"] = "".join(traceback.format_exception(exc))[-4000:]
    return line


def run_bench(tier: str, datasets, methods, ipcs, runs: int, out, seed: int = 0, device: str = "cpu",
              show_progress: bool = True, archs=("convnet",), compiled: bool = False,
              trust_results: bool = False, scores: bool = False) -> list[dict]:
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
        scores: also run what DD-Ranking's scores need (:mod:`ddkit.bench.scores`: a hard-label
            evaluation of soft-label sets, an evaluation without augmentation, the cached
            full-data reference) and store the scores in each line; finished cells get the
            missing evaluations only.

    Returns:
        The latest result line of every cell of this grid (failed cells carry ``"error"``), in
        grid order.

    Raises:
        DDKitError: bad input (unknown tier, dataset, method or architecture; a bad IPC or runs),
            or a dataset with cells to run that is not fetched yet (before any cell runs).
    """
    tier, datasets, methods, ipcs, archs, out = check_bench_request(tier, datasets, methods, ipcs, archs, runs, out, seed)
    device = resolve_device(device)
    if compiled:
        check_compile_available(device)
    cells = plan_cells(datasets, methods, ipcs)
    latest = latest_by_key(out)
    # A cell's status depends on its own set and result lines only, which no other cell touches.
    statuses_of = [cell_status(cell, out / SETS_DIR, tier, archs, runs, seed, latest, trust_results)
                   for cell in cells]
    # A dataset that is not fetched, or an IPC above its smallest class, would fail each of its cells,
    # perhaps hours in: refuse at once (writing nothing), unless all its cells are done already.
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
                                        "cells": len(cells), "started": utc_now()})

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
            if scores and score_cell(cell, label):
                return True
            say(f"{label}: done before, skipped")
            return True
        needs = [cell] + ([Cell(cell.dataset, BASELINE, cell.ipc)] if relabelled_method(cell.method) else [])
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
            if scores:
                lines = [with_scores(line) for line in lines]
            for line in lines:
                append_result(out, line)
        finally:
            for claim in claims:
                claim.release()
        summary = "; ".join(f"{line['arch']} {accuracy_text(line)}" if "error" not in line
                            else f"{line['arch']} FAILED: {line['error'].splitlines()[0]}" for line in lines)
        say(f"{label}: {summary} ({time.perf_counter() - started:.0f} s)")
        write_table(out)
        write_plots(out)
        return True

    def with_scores(line: dict) -> dict:
        """``line`` with the inputs of its scores evaluated and its scores against the latest lines."""
        if needs_score_inputs(line):
            try:
                line = add_score_inputs(line, out, device, show_progress, compiled)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # the cell's own result stands; say why it has no scores
                say(f"{line['dataset']} {line['method']} ipc {line['ipc']}: no scores ({exc})")
                return line
        found = line_scores(line, latest_results(read_results(out)) + [line])
        return {**line, "scores": found} if found else line

    def score_cell(cell: Cell, label: str) -> bool:
        """Add the scores' evaluations to a finished cell's lines that lack them, and rescore lines
        whose stored scores its baseline's later line changes; False when there is nothing to do
        (a set that is gone keeps its line: a results.jsonl carried without its sets)."""
        keys = {cell_key(cell, tier, arch, runs, seed) for arch in archs}
        latest = latest_results(read_results(out))
        lines = [line for line in latest if line_key(line) in keys]
        todo = [line for line in lines if needs_score_inputs(line) and (out / str(line.get("set"))).is_dir()]
        stale = [line for line in lines if line not in todo and "error" not in line
                 and line_scores(line, latest) != line.get("scores", {})]
        for line in stale:  # no evaluation needed: the scores of what is there now
            append_result(out, {**line, "scores": line_scores(line, latest)})
        if stale and not todo:
            say(f"{label}: done before; scores updated from its baseline's line")
            write_table(out)
            return True
        if not todo:
            return False
        claim = claim_cell(out, cell)
        if not claim.held:
            return False
        try:
            for line in todo:
                append_result(out, with_scores(line))
        finally:
            claim.release()
        say(f"{label}: done before; scores' evaluations added")
        write_table(out)
        return True

    deferred = []
    for number, (cell, statuses) in enumerate(zip(cells, statuses_of), 1):
        if not run_claimed(number, cell, statuses, last_try=False):
            deferred.append((number, cell, statuses))
    # Cells another process held: once more, in case it stopped or was only looking (--plan);
    # run_claimed reads the results again once it holds one.
    for number, cell, statuses in deferred:
        run_claimed(number, cell, statuses, last_try=True)
    if scores:  # a cell another process finished before its baseline's line was written
        for number, cell in enumerate(cells, 1):
            score_cell(cell, f"[{number}/{len(cells)}] {cell.dataset} {cell.method} ipc {cell.ipc} ({cell.protocol})")
    if not (out / TABLE_FILE).exists():
        write_table(out)
        write_plots(out)
    order = {cell_key(cell, tier, arch, runs, seed): index
             for index, (cell, arch) in enumerate((c, a) for c in cells for a in archs)}
    lines = [line for line in latest_results(read_results(out)) if line_key(line) in order]
    return sorted(lines, key=lambda line: order[line_key(line)])
