"""Rebuild result lines of the quick grid from the table that docs/benchmarks.md held at a commit.

Why: the grid ran for days in ``runs/bench-grid-quick`` (not tracked by git); on 2026-11-22 the
session's machine was replaced by a fresh checkout and that directory was lost with its sets. The
table in docs/benchmarks.md, rendered from its ``results.jsonl`` by ``grid_to_docs.py``, is what
survived. This script turns each row of that table back into a result line carrying everything
the row shows (accuracy mean and std, times, peak memory, bytes) and ``"recovered_from"``; what the
table does not show (the per-seed accuracies, the date of each line, the set's path) stays out.
``grid_to_docs.py`` renders a recovered line to the very row it came from (checked below).

Usage:
    python benchmarks/recover_grid_lines.py COMMIT [--doc docs/benchmarks.md] --out FILE
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

from ddkit.bench.table import COLUMNS, MIB, row_cells

START, END = "<!-- quick-grid:start -->", "<!-- quick-grid:end -->"
# What the bench command of the grid fixed (docs/benchmarks.md: --tier quick --runs 3, default seed and arch).
GRID_FIELDS = {"tier": "quick", "arch": "convnet", "runs": 3, "seed": 0}
# The machine those rows ran on, as docs/benchmarks.md described it then ("2 cores of an AMD EPYC
# (AVX2, no AVX-512)"), in the form of ddkit.utils.describe_cpu.
MACHINE = "AMD EPYC, AVX2, 2 cores"


def _seconds(text: str) -> tuple[float | None, bool]:
    """``"351.9 (compiled)"`` -> (351.9, True); ``"-"`` -> (None, False)."""
    compiled = text.endswith(" (compiled)")
    number = text.removesuffix(" (compiled)")
    return (None if number == "-" else float(number)), compiled


def line_from_row(cells: list[str], source: str) -> dict:
    """The result line that a table row (its cells, in ``COLUMNS`` order) was rendered from."""
    dataset, ipc, method, protocol, runs, accuracy, distill, evaluation, peak, image_bytes, soft_bytes = cells
    mean, std = (float(part) for part in accuracy.split(" +- "))
    distill_seconds, distill_compiled = _seconds(distill)
    eval_seconds, compiled = _seconds(evaluation)
    line = {"dataset": dataset, "method": method, "ipc": int(ipc), **GRID_FIELDS, "protocol": protocol,
            "mean": mean, "std": std, "distill_seconds": distill_seconds, "eval_seconds_per_run": eval_seconds,
            "image_bytes": int(image_bytes), "soft_label_bytes": int(soft_bytes), "device": "cpu",
            "machine": MACHINE, "recovered_from": source}
    if int(runs) != GRID_FIELDS["runs"]:
        raise SystemExit(f"a row with runs={runs}: not a row of the quick grid")
    if distill_compiled:
        line["distill_compiled"] = True
    if compiled:
        line["compiled"] = True
    if peak != "-":
        line["peak_memory_bytes"] = int(peak) * MIB
    return line


def table_rows(text: str) -> list[list[str]]:
    """The data rows of the quick-grid table between the markers of ``text``."""
    section = text[text.index(START):text.index(END)]
    header = "| " + " | ".join(COLUMNS) + " |"
    if header not in section:
        raise SystemExit("the quick-grid section has no table with the bench's columns")
    rows = []
    for row in section[section.index(header):].splitlines()[2:]:
        if not row.startswith("|"):
            break
        rows.append([cell.strip() for cell in row.strip().strip("|").split("|")])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit", help="the commit whose docs/benchmarks.md holds the table")
    parser.add_argument("--doc", default="docs/benchmarks.md", help="the document, as a path in the repository")
    parser.add_argument("--out", type=Path, required=True, help="the results.jsonl to write (replaced)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", args.commit], check=True, capture_output=True,
                            text=True).stdout.strip()
    text = subprocess.run(["git", "show", f"{commit}:{args.doc}"], check=True, capture_output=True, text=True).stdout
    source = f"{args.doc} at {commit}"
    lines = []
    for cells in table_rows(text):
        line = line_from_row(cells, source)
        if row_cells(line) != cells:  # the rebuilt line must render to the row it came from
            raise SystemExit(f"cannot rebuild {cells}: it renders as {row_cells(line)}")
        lines.append(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    print(f"{len(lines)} lines from {source} -> {args.out}")


if __name__ == "__main__":
    main()
