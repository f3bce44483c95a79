"""Copy a bench directory's table into docs/benchmarks.md, between two marker lines.

Usage:
    python benchmarks/grid_to_docs.py BENCH_DIR [--doc docs/benchmarks.md] [--datasets fashion-mnist,mnist]
        [--ipc 1,10,50] [--methods all]

The section between ``<!-- quick-grid:start -->`` and ``<!-- quick-grid:end -->`` is replaced by:
- how many cells of the planned grid (``--datasets`` x ``--methods`` x ``--ipc``, with the random
  and ``random+M`` baselines, as ``ddkit bench`` plans it) have a result, and which are missing;
- the dates of the first and last result line, and the machines they ran on;
- the table of the finished cells, rendered as the bench's own ``table.md`` (``ddkit.bench.table``);
- the accuracy-against-IPC plots of those cells, as the bench draws them
  (``ddkit.bench.plots.write_accuracy_plots``), written to ``--plots`` (default ``docs/img/quick-grid``)
  and linked from the section.

A cell the bench would make or evaluate again (``ddkit.bench.grid.line_changes``: its set was made
under an older preset, or is gone because the bench set it aside, or its evaluation was made under an
older evaluation preset) is not finished: it is listed with the cells still to run. With
``--trust-results`` (as ``ddkit bench --trust-results``), a line whose set is missing counts as
finished: for results kept in git without their sets (benchmarks/results/quick-grid/), and so does a
random subset that a ``random+M`` cell made again and nothing evaluated since.
Lines rebuilt from an earlier table (``"recovered_from"``) are counted
and named.

Nothing is measured here: every number comes from ``BENCH_DIR/results.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import re
from collections import Counter
from pathlib import Path

from ddkit.bench.grid import SETS_DIR, latest_results, line_changes, plan_cells, read_results
from ddkit.bench.plots import write_accuracy_plots
from ddkit.bench.table import COLUMNS, extra_columns, markdown_table, row_cells, sorted_lines
from ddkit.methods import METHODS

START, END = "<!-- quick-grid:start -->", "<!-- quick-grid:end -->"


def section(bench: Path, datasets: list[str], methods: list[str], ipcs: list[int], trust_results: bool = False,
            plots: Path | None = None, doc_dir: Path = Path("docs")) -> str:
    """The markdown that goes between the markers. With ``plots`` (a folder), the accuracy plots of
    the finished cells are written there and linked by paths relative to ``doc_dir``, the folder of
    the document."""
    lines = [line for line in latest_results(read_results(bench)) if "error" not in line]
    lines = [line for line in lines if not line_changes(line, bench / SETS_DIR, trust_results)]
    finished = {(line["dataset"], line["method"], line["ipc"]) for line in lines}
    planned = plan_cells(datasets, methods, ipcs)
    missing = [cell for cell in planned if (cell.dataset, cell.method, cell.ipc) not in finished]
    dates = sorted(line["date"] for line in lines if line.get("date"))
    devices = sorted({str(line.get("machine") or line.get("device")) for line in lines if line.get("date")})
    text = [f"**Progress:** {len(planned) - len(missing)} of {len(planned)} cells finished."]
    recovered = Counter(line["recovered_from"] for line in lines if line.get("recovered_from"))
    if dates:
        text.append(f"Result lines written from {dates[0]} to {dates[-1]}, on: {', '.join(devices)}.")
    if recovered:
        text.append("Rebuilt from an earlier table (their run directory was lost; per-seed accuracies and "
                    "dates were not in the table): " + ", ".join(f"{count} lines from {source}"
                                                                for source, count in recovered.items()) + ".")
    if missing:
        groups: dict[tuple[int, str], list[str]] = {}
        for cell in missing:
            groups.setdefault((cell.ipc, cell.dataset), []).append(cell.method)
        text.append("Still to run:\n" + "\n".join(f"- IPC {ipc}, {dataset}: {', '.join(names)}"
                                                   for (ipc, dataset), names in groups.items()))
    keys = {(c.dataset, c.method, c.ipc) for c in planned}
    shown = [line for line in sorted_lines(lines) if (line["dataset"], line["method"], line["ipc"]) in keys]
    extra = extra_columns(shown)
    rows = [row_cells(line, extra) for line in shown]
    text.append(markdown_table(list(COLUMNS) + list(extra), rows))
    if plots is not None:
        links = [f"![{path.stem}]({Path(os.path.relpath(path, doc_dir)).as_posix()})"
                 for path in write_accuracy_plots(shown, plots)]
        text.append("Accuracy against IPC, with the standard deviation of the runs as error bars "
                    "(baselines dashed):\n\n" + "\n".join(links))
    return "\n\n".join(text)


def replace_section(doc: Path, body: str) -> None:
    text = doc.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{doc} has no {START} ... {END} section; add the two marker lines first")
    doc.write_text(pattern.sub(lambda _: f"{START}\n{body}\n{END}", text), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="the bench directory (holds results.jsonl)")
    parser.add_argument("--doc", type=Path, default=Path("docs/benchmarks.md"), help="the document to update")
    parser.add_argument("--datasets", default="fashion-mnist,mnist", help="datasets of the planned grid")
    parser.add_argument("--methods", default="all", help="methods of the planned grid (default: every method)")
    parser.add_argument("--ipc", default="1,10,50", help="IPC values of the planned grid")
    parser.add_argument("--trust-results", action="store_true",
                        help="count a line whose set is missing as finished (results kept without their sets)")
    parser.add_argument("--plots", type=Path, default=Path("docs/img/quick-grid"),
                        help="folder for the accuracy-against-IPC plots the section links to")
    args = parser.parse_args()
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    body = section(args.bench, args.datasets.split(","), methods, [int(v) for v in args.ipc.split(",")],
                   args.trust_results, args.plots, args.doc.parent)
    replace_section(args.doc, body)
    print(f"updated {args.doc} from {args.bench}")


if __name__ == "__main__":
    main()
