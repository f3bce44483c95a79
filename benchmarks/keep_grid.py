"""Keep the quick grid's progress in git: its result lines, and the sets of cells not finished yet.

A session of this project may start on a fresh checkout, where ``runs/`` (not tracked) is gone. So
the grid's progress is copied into ``benchmarks/results/quick-grid/`` and committed:

- ``results.jsonl``: the run directory's result lines (it starts as a copy of this file and is
  only appended to, so the copy back is a superset; anything else is refused);
- ``sets/<cell>/``: for each cell that has a saved set but no result line yet, the set
  (``data.safetensors``, ``manifest.json``, whose records hold the evaluation runs finished so
  far) and its evaluation-run checkpoints, so that a fresh checkout continues the cell instead of
  distilling and evaluating it again. A cell that has finished has its carried set removed.
  Distillation checkpoints are not kept (a distillation runs well within a session).

``benchmarks/quick_grid.sh`` puts both into a new run directory. A long cell, such as IDM's three
70-minute evaluation runs on MNIST IPC 50, can then span sessions, losing at most the time since
its evaluation run's last epoch checkpoint.

Usage: python benchmarks/keep_grid.py [RUN_DIR] [--kept DIR]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ddkit.bench.grid import RESULTS_FILE, SETS_DIR, latest_results, read_results, set_name
from ddkit.evaluate.protocols import EVAL_CHECKPOINT_DIR
from ddkit.store.distilled import DATA_FILE, MANIFEST_FILE

KEPT = Path("benchmarks/results/quick-grid")


def _copy_results(run: Path, kept: Path) -> int:
    """Copy ``results.jsonl`` from the run directory to ``kept``; returns how many lines are new."""
    new = (run / RESULTS_FILE).read_text(encoding="utf-8")
    old = (kept / RESULTS_FILE).read_text(encoding="utf-8") if (kept / RESULTS_FILE).is_file() else ""
    if not new.startswith(old):
        raise SystemExit(f"{run / RESULTS_FILE} does not start with {kept / RESULTS_FILE}: it was not started "
                         "from it (benchmarks/quick_grid.sh starts it so); nothing copied")
    kept.mkdir(parents=True, exist_ok=True)
    (kept / RESULTS_FILE).write_text(new, encoding="utf-8")
    return len(new[len(old):].splitlines())


def _set_files(folder: Path) -> list[Path]:
    """The files of a set worth carrying: its data, manifest and evaluation-run checkpoints."""
    files = [folder / DATA_FILE, folder / MANIFEST_FILE]
    return files + sorted((folder / EVAL_CHECKPOINT_DIR).glob("*.safetensors"))


def keep(run: Path, kept: Path) -> list[str]:
    """Copy the grid's progress from ``run`` into ``kept``; returns one line per thing done."""
    report = [f"results.jsonl: {_copy_results(run, kept)} new lines"]
    finished = {set_name(line["dataset"], line["method"], line["ipc"])
                for line in latest_results(read_results(run)) if "error" not in line}
    for carried in sorted((kept / SETS_DIR).glob("*")):
        if carried.name in finished:
            shutil.rmtree(carried)
            report.append(f"{carried.name}: finished, carried set removed")
    for folder in sorted((run / SETS_DIR).glob("*")):
        if (folder.name in finished or folder.name.startswith(".") or ".superseded-" in folder.name
                or not (folder / MANIFEST_FILE).is_file()):
            continue
        target = kept / SETS_DIR / folder.name
        if target.exists():
            shutil.rmtree(target)
        for source in _set_files(folder):
            destination = target / source.relative_to(folder)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
        size = sum(path.stat().st_size for path in target.rglob("*") if path.is_file())
        report.append(f"{folder.name}: not finished, set carried ({size / 2**20:.1f} MiB)")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, default=Path("runs/bench-grid-quick"),
                        help="the run directory of the grid (default runs/bench-grid-quick)")
    parser.add_argument("--kept", type=Path, default=KEPT, help=f"where git keeps the progress (default {KEPT})")
    args = parser.parse_args()
    print("\n".join(keep(args.run, args.kept)))
    print(f"now commit {args.kept}")


if __name__ == "__main__":
    main()
