"""The bench table: the latest line of every cell of ``results.jsonl``, as rows and as markdown."""

from __future__ import annotations

from pathlib import Path

from ddkit.bench.cells import BASELINE, relabelled_method
from ddkit.bench.results import TABLE_FILE, latest_results, read_results
from ddkit.bench.scores import line_scores, score_columns
from ddkit.evaluate.scores import LEGEND, SCORE_NAMES
from ddkit.evaluate.protocols import accuracy_text as spread
from ddkit.utils import write_text_atomic

MIB = 1024 * 1024
#: Column titles of the table, in order; "arch" and "tier" are added when the results mix several.
COLUMNS = ("dataset", "IPC", "method", "protocol", "runs", "accuracy % (mean +- std)", "distill s", "eval s/run",
           "peak memory MiB", "image bytes", "soft-label bytes", "total bytes")


def method_order(method: str) -> tuple:
    """Sort key: the random subset first, then its relabelled forms, then the methods by name."""
    if method == BASELINE:
        return (0, method)
    if relabelled_method(method):
        return (1, method)
    return (2, method)


def sorted_lines(lines: list[dict]) -> list[dict]:
    """Lines sorted by dataset and IPC; in each, the baselines first, then the methods best first
    (by label-robust score when every method of that dataset and IPC has one, else by accuracy;
    failed cells last), then by name, protocol, architecture and tier."""
    scores = {id(line): line_scores(line, lines).get("LRS") for line in lines}
    methods = [line for line in lines if method_order(str(line.get("method")))[0] == 2
               and "error" not in line and line.get("mean") is not None]
    by_lrs = {(line.get("dataset"), line.get("ipc")) for line in methods}
    by_lrs -= {(line.get("dataset"), line.get("ipc")) for line in methods if scores[id(line)] is None}

    def merit(line) -> float:
        if "error" in line or line.get("mean") is None:
            return float("inf")
        if (line.get("dataset"), line.get("ipc")) in by_lrs:
            return -float(scores[id(line)])
        return -float(line["mean"])

    def key(line):
        group = method_order(str(line.get("method")))
        return (str(line.get("dataset")), int(line.get("ipc") or 0), group[0],
                merit(line) if group[0] == 2 else 0.0, group[1], str(line.get("protocol")), str(line.get("arch")),
                str(line.get("tier")))

    return sorted(lines, key=key)


def _number(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{float(value):.{digits}f}"


def accuracy_text(line: dict) -> str:
    """``"80.76 +- 0.09"``, or ``"failed: <first line of the error>"``."""
    if "error" in line:
        first = str(line["error"]).strip().splitlines()[0] if str(line["error"]).strip() else "error"
        return f"failed: {first[:160]}"
    runs = len(line.get("accuracies") or []) or line.get("runs")
    return spread(line["mean"], line["std"], runs)


def row_cells(line: dict, extra: tuple[str, ...] = ()) -> list[str]:
    """One table row as strings, in :data:`COLUMNS` order followed by ``extra`` fields."""
    failed = "error" in line
    peak = line.get("peak_memory_bytes")
    cells = [
        str(line.get("dataset")), str(line.get("ipc")), str(line.get("method")), str(line.get("protocol")),
        str(line.get("runs", "-")), accuracy_text(line),
        # compiled distillations and evaluations (bench --compile) run faster per step: say so where the time is
        "-" if failed else _number(line.get("distill_seconds")) + (" (compiled)" if line.get("distill_compiled") else ""),
        "-" if failed else _number(line.get("eval_seconds_per_run")) + (" (compiled)" if line.get("compiled") else ""),
        "-" if failed or peak is None else f"{peak / MIB:.0f}",
        "-" if failed else str(line.get("image_bytes", "-")),
        "-" if failed else str(line.get("soft_label_bytes", "-")),
        "-" if failed or line.get("image_bytes") is None else str(total_bytes(line)),
    ]
    return cells + [str(line.get(name, "-")) for name in extra]


def total_bytes(line: dict) -> int:
    """What a cell's set costs to store: its images and its soft-label records, in bytes."""
    return int(line.get("image_bytes") or 0) + int(line.get("soft_label_bytes") or 0)


def extra_columns(lines: list[dict]) -> tuple[str, ...]:
    """``arch``, ``tier`` and ``machine`` when the lines hold more than one of them (times are
    comparable only between rows of one machine)."""
    return tuple(name for name in ("arch", "tier", "machine") if len({line.get(name) for line in lines}) > 1)


def table_rows(directory: str | Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the bench directory's table, from ``results.jsonl``."""
    return rows_of(latest_results(read_results(directory)))


def rows_of(lines: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a table of result ``lines`` (sorted here; score columns where any line
    has a score, scored against the baselines among ``lines``)."""
    lines = sorted_lines(lines)
    extra = extra_columns(lines)
    scores = score_columns(lines)
    rows = []
    for line in lines:
        values = line_scores(line, lines)
        shown = {name: f"{values[name]:.2f}" if name in values else "-" for name in scores}
        rows.append(row_cells({**line, **shown}, extra + scores))
    return list(COLUMNS) + list(extra) + list(scores), rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table; ``|`` and newlines inside cells are escaped so a cell cannot break a row."""
    def escape(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]
    return "\n".join(out)


def write_table(directory: str | Path) -> Path:
    """(Re)write ``table.md`` of a bench directory atomically; returns its path."""
    directory = Path(directory)
    header, rows = table_rows(directory)
    text = "\n".join([
        "# ddkit bench",
        "",
        "Final-epoch test accuracy, mean +- population std over the runs. `random` is the random real "
        "subset (hard labels); `random+M` is that subset relabelled with method M's teachers, the fair "
        "baseline for the soft-label methods. Peak memory is the resident set (CPU) or the allocated "
        "CUDA memory while the set was made. \"(compiled)\": the set was made, or its evaluation "
        "networks trained, with `--compile`: through torch.compile wherever the step can (for the "
        "statistics family, only teachers not cached yet), the same computation in fused kernels. Total "
        "bytes: images plus soft-label records, what the set costs to store.",
        "",
        markdown_table(header, rows),
        "",
        *[f"- {name}: {LEGEND[name]}" for name in SCORE_NAMES if name in header],
        "",
    ])
    return write_text_atomic(directory / TABLE_FILE, text)
