"""What a newcomer meets first: data info of a dataset not set up, the one-run accuracy, show's
wrapping grid, error hints that name the command line's own options, and docs that cite papers."""

import re
from pathlib import Path

from PIL import Image

import ddkit
from ddkit.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def test_data_info_says_when_a_dataset_is_not_set_up(isolated_data, capsys):
    assert main(["data", "info", "cifar10"]) == 0
    out = capsys.readouterr().out
    assert "NOT SET UP" in out and "ddkit data fetch cifar10 --from DIR" in out
    assert main(["data", "info", "mnist"]) == 0
    assert "NOT SET UP" in (out := capsys.readouterr().out) and "`ddkit data fetch mnist`" in out
    assert main(["data", "info", "digits"]) == 0
    assert "status        set up" in capsys.readouterr().out


def test_one_run_reads_1_run_not_a_zero_spread(isolated_data, tmp_path, capsys):
    ddkit.distill("random", dataset="digits", ipc=1, out=tmp_path / "set")
    assert main(["eval", str(tmp_path / "set"), "--preset", "smoke", "--runs", "1", "-q", "--set", "epochs=1"]) == 0
    row = capsys.readouterr().out.splitlines()[1]
    assert re.search(r"\d+\.\d\d \(1 run\)", row) and "+-" not in row


def test_show_wraps_a_class_into_rows_of_columns(isolated_data, tmp_path, capsys):
    ddkit.distill("random", dataset="digits", ipc=5, out=tmp_path / "set")
    assert main(["show", str(tmp_path / "set"), "--columns", "2"]) == 0
    grid = Image.open(capsys.readouterr().out.strip())
    cell = 32 + 2  # 8 px digits drawn at 32 px, 2 px apart
    assert grid.size == (96 + 2 * cell, 10 * 3 * cell)  # 5 images a class: rows of 2, 2 and 1
    assert main(["show", str(tmp_path / "set")]) == 0  # default 20 columns: one row a class, all 5 images
    assert Image.open(capsys.readouterr().out.strip()).size == (96 + 5 * cell, 10 * cell)


def test_a_set_without_soft_labels_names_the_cli_fix_first(isolated_data, tmp_path, capsys):
    ddkit.distill("random", dataset="digits", ipc=1, out=tmp_path / "set")
    assert main(["eval", str(tmp_path / "set"), "--protocol", "soft", "--preset", "smoke", "-q"]) == 2
    err = capsys.readouterr().err
    assert "ddkit relabel SET --like sre2l" in err and "in Python pass teachers= to ddkit.evaluate" in err


def test_help_readme_and_docs_cite_papers_not_notes_outside_the_repository():
    texts = {name: (ROOT / name).read_text() for name in ("README.md", "docs/methods.md", "docs/architecture.md",
                                                          "docs/scaling.md")}
    parser = build_parser()
    texts["ddkit --help"] = parser.format_help()
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            texts[f"ddkit {name} --help"] = sub.format_help()
    for where, text in texts.items():
        assert not re.search(r"\bSPEC\b", text), where
        assert "design notes" not in text, where
