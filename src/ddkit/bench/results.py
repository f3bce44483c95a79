"""The bench's results store: ``results.jsonl`` under a bench directory, one JSON line per finished
(cell, architecture), appended and fsync'ed, so a crash loses at most the cell that was running; a
new line with the same key (:data:`KEY_FIELDS`) replaces an older one. The file and folder names of
a bench directory are declared here (see :mod:`ddkit.bench.grid` for the layout)."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

RESULTS_FILE = "results.jsonl"
TABLE_FILE = "table.md"
PLOTS_DIR = "plots"
SETS_DIR = "sets"
SPEC_FILE = "bench.json"
#: The fields that name a result line; a new line with the same key replaces an older one.
KEY_FIELDS = ("dataset", "method", "ipc", "tier", "arch", "runs", "seed")


def line_key(line: dict) -> tuple:
    """What identifies a result line: its :data:`KEY_FIELDS` (dataset, method, IPC, tier, arch, runs, seed)."""
    return tuple(line.get(name) for name in KEY_FIELDS)


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


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (the ``date`` of a result line)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def latest_by_key(directory: str | Path) -> dict[tuple, dict]:
    """The latest result line of every :func:`line_key` in the bench directory's results."""
    return {line_key(line): line for line in latest_results(read_results(directory))}
