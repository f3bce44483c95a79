"""Copy a bench's table, with DD-Ranking's scores where its lines have them, into a document between
two marker lines (``<!-- NAME:start -->`` and ``<!-- NAME:end -->``).

Usage:
    python benchmarks/table_to_docs.py BENCH_DIR --doc docs/benchmarks.md --marker NAME [--ipc 1,10]
        [--datasets fashion-mnist,mnist] [--methods sre2l,random+sre2l]

The table is the bench's own (``ddkit.bench.table.rows_of``: the baselines first, then the methods
best first, the score columns and their legend); a line is kept when its dataset, IPC and method
are among those given (all by default). Nothing is measured here: every number comes from
``BENCH_DIR/results.jsonl``. When both ``--ipc`` and ``--datasets`` are given, the section ends with
the cells of that grid (the bench's default methods unless ``--methods``) that have no line yet, so
an unfinished grid says what it lacks.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ddkit.bench.cells import plan_cells
from ddkit.bench.cli import default_methods
from ddkit.bench.results import latest_results, read_results
from ddkit.bench.table import markdown_table, rows_of
from ddkit.evaluate.scores import LEGEND, SCORE_NAMES
from ddkit.utils import split_names


def section(bench: Path, ipcs=None, datasets=None, methods=None) -> str:
    """The markdown that goes between the markers."""
    lines = [line for line in latest_results(read_results(bench))
             if (not ipcs or int(line.get("ipc", 0)) in ipcs) and (not datasets or line.get("dataset") in datasets)
             and (not methods or line.get("method") in methods)]
    header, rows = rows_of(lines)
    dates = sorted(line["date"] for line in lines if line.get("date"))
    machines = sorted({str(line.get("machine") or line.get("device")) for line in lines if line.get("date")})
    text = []
    if dates:
        text.append(f"Result lines written from {dates[0]} to {dates[-1]}, on: {', '.join(machines)}.")
    text += ["", markdown_table(header, rows), ""]
    text += [f"- {name}: {LEGEND[name]}" for name in SCORE_NAMES if name in header]
    if ipcs and datasets:
        text += ["", missing_cells(lines, datasets, methods or default_methods(), ipcs)]
    return "\n".join(text).strip() + "\n"


def missing_cells(lines: list[dict], datasets: list[str], methods: list[str], ipcs: list[int]) -> str:
    """One sentence naming the grid's cells without a result line, per dataset and IPC (or saying none)."""
    have = {(line.get("dataset"), line.get("method"), int(line.get("ipc", 0))) for line in lines}
    lacking: dict[tuple[str, int], list[str]] = {}
    for cell in plan_cells(datasets, methods, ipcs):
        if (cell.dataset, cell.method, cell.ipc) not in have:
            lacking.setdefault((cell.dataset, cell.ipc), []).append(cell.method)
    if not lacking:
        return "Every cell of the grid has its line."
    parts = [f"{dataset} IPC {ipc}: {', '.join(methods)}" for (dataset, ipc), methods in lacking.items()]
    return f"Cells not measured yet ({sum(map(len, lacking.values()))}): " + "; ".join(parts) + "."


def replace_section(doc: Path, marker: str, body: str) -> None:
    """Replace what lies between the document's two markers with ``body``."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = doc.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{doc} has no {start} ... {end} section")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    doc.write_text(pattern.sub(lambda _: f"{start}\n{body}{end}", text, count=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", type=Path, help="bench directory (or the folder of a results.jsonl)")
    parser.add_argument("--doc", type=Path, required=True, help="document whose marked section is replaced")
    parser.add_argument("--marker", required=True, help="section name of the <!-- NAME:start/end --> markers")
    parser.add_argument("--ipc", default="", help="comma-separated IPCs to keep (default all)")
    parser.add_argument("--datasets", default="", help="comma-separated datasets to keep (default all)")
    parser.add_argument("--methods", default="", help="comma-separated methods to keep (default all)")
    args = parser.parse_args()
    ipcs = [int(item) for item in split_names(args.ipc)]
    replace_section(args.doc, args.marker, section(args.bench, ipcs, split_names(args.datasets),
                                                   split_names(args.methods)))


if __name__ == "__main__":
    main()
