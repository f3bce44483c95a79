"""Every `ddkit ...` line of the README runs, in the README's order, after what `make demo` makes.

`make demo` distills Fashion-MNIST at the quick tier (minutes); this test builds the same two
folders, ``runs/demo/random-fmnist-ipc10`` and ``runs/demo/dm-fmnist-ipc10``, at the smoke tier on
digits in a temporary folder, then runs each README line there (in this process, through
``ddkit.cli.main``; ``--nproc 2`` lines start torchrun as written). To keep the suite fast the lines
run on small settings, by these substitutions and nothing else:

- a trailing ``# comment`` and optional ``[...]`` groups are dropped; ``A & B`` runs A, then B;
- ``fashion-mnist`` -> ``digits`` (bundled with scikit-learn, 8 x 8 images, nothing to fetch);
- ``--preset quick`` / ``--tier quick`` -> ``smoke``, ``--runs 3`` -> ``--runs 1``, ``--ipc 10`` ->
  ``--ipc 2``, ``--ipc 1,10`` -> ``--ipc 1``, ``iterations=1000`` -> ``iterations=5``, and the
  squeezed ``--arch resnet18_bn`` gets ``--model width=4`` (a full-width ResNet-18 takes minutes);
- where a line leaves ``--preset`` or ``--runs`` of eval, squeeze or relabel at its default (quick,
  3 runs), ``--preset smoke`` and ``--runs 1`` are added; bench gets ``--datasets digits``;
- the files a line reads but the README does not make are made first: the DM-script file
  ``res_DM_FashionMNIST_ConvNet_10ipc.pt`` (``runs/dm`` saved as the DM scripts save a set), and,
  before ``ddkit distill --resume runs/dm``, an interrupted run in ``runs/dm``.

A README line this test cannot run fails it, so the README and the test change together.
"""

import re
import shlex
from pathlib import Path

import pytest
import torch

import ddkit
from ddkit.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
SUBSTITUTIONS = [(r"\bfashion-mnist\b", "digits"), (r"--preset quick\b", "--preset smoke"),
                 (r"--tier quick\b", "--tier smoke"), (r"--runs 3\b", "--runs 1"), (r"--ipc 10\b", "--ipc 2"),
                 (r"--ipc 1,10\b", "--ipc 1"), (r"iterations=1000\b", "iterations=5"),
                 (r"--arch resnet18_bn\b", "--arch resnet18_bn --model width=4")]


def readme_lines() -> list[str]:
    """The `ddkit ...` lines of the README's code blocks, as written."""
    lines, fenced = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced and line.startswith("ddkit "):
            lines.append(line)
    return lines


def small(line: str) -> list[list[str]]:
    """A README line as the argument lists this test runs (see the module docstring)."""
    line = re.split(r"\s#\s", line, maxsplit=1)[0]
    line = re.sub(r"\[[^\]]*\]", "", line)
    for pattern, replacement in SUBSTITUTIONS:
        line = re.sub(pattern, replacement, line)
    commands = []
    for part in line.split("&"):
        argv = shlex.split(part)
        if not argv:
            continue
        assert argv[0] == "ddkit", line
        argv = argv[1:]
        if argv[0] in ("eval", "squeeze", "relabel") and "--recipe" not in argv[1:2] and "list" not in argv:
            argv += [] if "--preset" in argv else ["--preset", "smoke"]
            argv += [] if "--runs" in argv or argv[0] != "eval" else ["--runs", "1"]
        if argv[0] == "bench":
            argv += ["--datasets", "digits"]
        commands.append(argv)
    return commands


def _demo_like(runs: Path) -> None:
    """What `make demo` leaves, at the smoke tier on digits."""
    assert main(["baseline", "random", "--dataset", "digits", "--ipc", "2", "--out",
                 str(runs / "demo" / "random-fmnist-ipc10")]) == 0
    assert main(["distill", "dm", "--dataset", "digits", "--ipc", "2", "--preset", "smoke", "-q", "--out",
                 str(runs / "demo" / "dm-fmnist-ipc10")]) == 0
    for name in ("random-fmnist-ipc10", "dm-fmnist-ipc10"):
        assert main(["eval", str(runs / "demo" / name), "--preset", "smoke", "--runs", "1", "-q", "--reuse"]) == 0


def _dm_script_file(path: Path) -> None:
    """``runs/dm`` saved as the DM scripts save a set: normalised images under ``data``."""
    made = ddkit.load("runs/dm")
    mean = torch.tensor(made.mean).view(1, -1, 1, 1)
    std = torch.tensor(made.std).view(1, -1, 1, 1)
    torch.save({"data": [[(made.images - mean) / std, made.labels]], "accs_all_exps": {"ConvNet": [0.0]}}, path)


def _interrupted_run(monkeypatch) -> None:
    """``runs/dm`` as a distillation stopped at iteration 3 leaves it (a checkpoint, no set)."""
    from ddkit.methods.matching import MatchingEngine

    real_step = MatchingEngine.step

    def stop_at_3(self, iteration):
        if iteration == 3:
            raise KeyboardInterrupt
        return real_step(self, iteration)

    monkeypatch.setattr(MatchingEngine, "step", stop_at_3)
    assert main(["distill", "dm", "--dataset", "digits", "--ipc", "2", "--preset", "smoke", "--out", "runs/dm",
                 "--overwrite", "--checkpoint-every", "1", "-q"]) == 130
    monkeypatch.setattr(MatchingEngine, "step", real_step)
    assert (Path("runs/dm") / "checkpoint").is_dir()


def test_every_readme_command_line_runs_after_the_demo(isolated_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small networks on a busy two-core machine: one thread is faster
    try:
        _run_readme(monkeypatch, capsys)
    finally:
        torch.set_num_threads(threads)


def _run_readme(monkeypatch, capsys) -> None:
    """Build the demo-like sets, then run every README line (small) in the current folder."""
    _demo_like(Path("runs"))
    lines = readme_lines()
    assert len(lines) >= 20 and any(line.startswith("ddkit report runs ") for line in lines)
    for line in lines:
        for argv in small(line):
            if argv[0] == "import":
                _dm_script_file(Path(argv[1]))
            if argv[:2] == ["distill", "--resume"]:
                _interrupted_run(monkeypatch)
            capsys.readouterr()
            code = main(argv)
            out, err = capsys.readouterr()
            assert code == 0, f"README line {line!r} ran as {argv}: exit {code}\n{err[-2000:]}"
    page = Path("runs/report.html").read_text()  # the last line: every set under runs/, make demo's too
    assert "demo/dm-fmnist-ipc10" in page and "demo/random-fmnist-ipc10" in page and "dm-original" in page
