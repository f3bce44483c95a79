"""Side-by-side table of two bench result files: the same cells before and after a change.

Usage:
    python benchmarks/compare_results.py OLD NEW [--methods idm,ddm] [--reference random,dm]
        [--doc docs/benchmarks.md --marker NAME]

OLD and NEW are ``results.jsonl`` files or bench directories holding one. Every (dataset, IPC,
method) cell of NEW that ``--methods`` keeps (default: all) gets a row with its old and new mean
+- std and the change; ``--reference`` adds OLD's cells of those methods as rows of their own, for
context (e.g. the random subset and DM). Where a NEW cell is a ``random+M`` baseline, its row says
so. Lines with an ``error`` are skipped; the last line of a cell wins, as in ``ddkit bench``.

Without ``--doc`` the table is printed. With it, the text between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` in that file is replaced, so a documented table is always regenerated from the
results it shows. Nothing is measured here.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from ddkit.bench.table import accuracy_text

KEY = ("dataset", "ipc", "method")


def read_lines(path: str | Path) -> dict[tuple, dict]:
    """The last error-free line of every (dataset, IPC, method) cell of a ``results.jsonl`` file
    (or of the one in a bench directory), keyed by that triple; torn lines are skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.jsonl"
    cells: dict[tuple, dict] = {}
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict) and all(k in line for k in KEY) and "error" not in line:
            cells[tuple(line[k] for k in KEY)] = line
    return cells


def accuracy(line: dict | None) -> str:
    """``mean +- std`` (percent, two decimals) of a result line, with ``(1 run)`` for one run."""
    return "-" if line is None else accuracy_text(line)


def comparison_table(old: dict[tuple, dict], new: dict[tuple, dict], methods: list[str] | None = None,
                     reference: list[str] | None = None) -> str:
    """Markdown table: one row per cell of ``new`` (kept by ``methods``) with old, new and change in
    points, plus ``reference`` methods' cells of ``old`` (same datasets and IPCs) marked as such.
    Rows are sorted by dataset, IPC, then references first."""
    keep = set(methods) if methods else None
    rows = []
    cells = {key for key in new if keep is None or key[2] in keep}
    grid = {(dataset, ipc) for dataset, ipc, _ in cells}
    for dataset, ipc, method in cells:
        before, after = old.get((dataset, ipc, method)), new[(dataset, ipc, method)]
        change = f"{after['mean'] - before['mean']:+.2f}" if before else "-"
        rows.append(((dataset, ipc, 1, method), [dataset, str(ipc), method, accuracy(before), accuracy(after), change]))
    for (dataset, ipc, method), line in old.items():
        if reference and method in reference and (dataset, ipc) in grid and (dataset, ipc, method) not in cells:
            rows.append(((dataset, ipc, 0, method), [dataset, str(ipc), f"{method} (reference)", accuracy(line), "not re-run", "-"]))
    header = ["dataset", "IPC", "method", "before % (mean +- std)", "after % (mean +- std)", "change (points)"]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells_) + " |" for _, cells_ in sorted(rows)]
    return "\n".join(out)


def replace_section(doc: Path, marker: str, text: str) -> None:
    """Replace what lies between ``<!-- marker:start -->`` and ``<!-- marker:end -->`` in ``doc``;
    a document without both markers is an error (nothing is written)."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    content = doc.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(content):
        raise SystemExit(f"error: {doc} has no '{start}' ... '{end}' markers; add them where the table goes")
    doc.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", content, count=1), encoding="utf-8")


def _names(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="results.jsonl (or bench directory) before the change")
    parser.add_argument("new", help="results.jsonl (or bench directory) after the change")
    parser.add_argument("--methods", default=None, help="comma-separated methods of NEW to show (default: all)")
    parser.add_argument("--reference", default="", help="comma-separated methods of OLD shown as reference rows")
    parser.add_argument("--doc", type=Path, default=None, help="document whose marked section is replaced")
    parser.add_argument("--marker", default=None, help="section name of the <!-- NAME:start/end --> markers")
    args = parser.parse_args(argv)
    table = comparison_table(read_lines(args.old), read_lines(args.new),
                             _names(args.methods) or None, _names(args.reference))
    if args.doc is None:
        print(table)
        return
    if not args.marker:
        parser.error("--doc needs --marker NAME")
    replace_section(args.doc, args.marker, table)


if __name__ == "__main__":
    main()
