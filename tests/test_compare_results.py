"""benchmarks/compare_results.py: the before/after tables of docs/benchmarks.md are generated from
the result lines they show."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("compare_results", ROOT / "benchmarks" / "compare_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "{torn", encoding="utf-8")
    return path


def _line(method, mean, std=0.5, runs=3, **extra):
    return {"dataset": "mnist", "ipc": 10, "method": method, "mean": mean, "std": std, "runs": runs, **extra}


def test_rows_show_old_new_and_change_with_references_and_one_run_spelled_out(tmp_path):
    script = _script()
    old = _write(tmp_path / "old.jsonl", [_line("idm", 90.0), _line("idm", 95.02, 0.17), _line("dm", 96.41, 0.16),
                                           _line("random", 92.15, 0.41), _line("ddm", 1.0)])
    new = _write(tmp_path / "new.jsonl", [_line("idm", 94.75, 0.18), _line("ddm", 50.0, error="boom"),
                                           _line("iid", 96.0, 0.0, runs=1)])
    table = script.comparison_table(script.read_lines(old), script.read_lines(new), reference=["dm"]).splitlines()
    assert table[2:] == [
        "| mnist | 10 | dm (reference) | 96.41 +- 0.16 | not re-run | - |",
        "| mnist | 10 | idm | 95.02 +- 0.17 | 94.75 +- 0.18 | -0.27 |",   # the last old line of a cell wins
        "| mnist | 10 | iid | - | 96.00 (1 run) | - |",                     # no old cell; one run said so
    ]                                                                       # ddm: its new line is an error


def test_doc_section_is_replaced_between_markers_and_a_doc_without_them_is_refused(tmp_path):
    script = _script()
    doc = tmp_path / "doc.md"
    doc.write_text("head\n<!-- t:start -->\nold table\n<!-- t:end -->\ntail\n", encoding="utf-8")
    script.replace_section(doc, "t", "| new |")
    assert doc.read_text(encoding="utf-8") == "head\n<!-- t:start -->\n| new |\n<!-- t:end -->\ntail\n"
    with pytest.raises(SystemExit, match="no '<!-- other:start -->'"):
        script.replace_section(doc, "other", "x")
