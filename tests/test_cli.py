"""The command line: help everywhere, one-line errors with exit code 2, end-to-end flows on digits."""

import json
import subprocess
import sys

import pytest

import ddkit

from ddkit.cli import build_parser, main

COMMANDS = [
    [], ["data"], ["data", "list"], ["data", "info"], ["data", "fetch"], ["distill"], ["eval"], ["baseline"],
    ["baseline", "random"], ["export"], ["show"], ["config"],
]


@pytest.mark.parametrize("words", COMMANDS, ids=lambda w: " ".join(w) or "ddkit")
def test_every_command_has_help(words, capsys):
    with pytest.raises(SystemExit) as stop:
        main(words + ["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "usage: ddkit" in text


def test_every_option_has_help_text():
    def walk(parser):
        for action in parser._actions:
            if action.choices and isinstance(action.choices, dict):
                for sub in action.choices.values():
                    yield from walk(sub)
            elif action.dest != "help":
                yield parser.prog, action

    missing = [f"{prog} {action.dest}" for prog, action in walk(build_parser()) if not action.help]
    assert missing == []


def run_cli(capsys, *words):
    code = main(list(words))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("words, match", [
    (["data", "info", "no-such-set"], "unknown"),
    (["baseline", "random", "--dataset", "digits", "--ipc", "5000", "--out", "OUT"], "larger than the smallest class"),
    (["distill", "nomethod", "--dataset", "digits", "--ipc", "1", "--out", "OUT"], "unknown method"),
    (["distill", "dm", "--dataset", "digits", "--ipc", "1", "--out", "OUT", "--terms", "sparkle"], "unknown loss term"),
    (["distill", "dm", "--dataset", "digits", "--ipc", "1", "--out", "OUT", "--weight", "cm=-2"], "non-negative"),
    (["distill", "dm", "--dataset", "digits", "--ipc", "1", "--out", "OUT", "--set", "nosuch=1"], "unknown dm option"),
    (["eval", "NOSET"], "not a directory"),
    (["show", "NOSET", "--columns", "0"], "--columns must be at least 1"),
    (["distill", "dm", "--dataset", "digits", "--ipc", "1", "--out", "OUT", "--nproc", "0"], "--nproc must be at least 1"),
    (["distill", "dm", "--dataset", "digits", "--ipc", "1", "--out", "OUT", "--checkpoint-minutes", "-1"],
     "--checkpoint-minutes must be above 0"),
    (["recover", "--dataset", "digits", "--ipc", "1"], "recover needs METHOD, --out (or --resume DIR"),
    (["recover", "--resume", "NOSET"], "no checkpoint in"),
    (["distill", "dm", "--dataset", "digits", "--ipc", "1", "--out", "OUT", "--device", "cuda"], "CUDA"),
])
def test_bad_input_is_one_line_and_exit_2(words, match, capsys, tmp_path):
    words = [str(tmp_path / w) if w in ("OUT", "NOSET") else w for w in words]
    code, _, err = run_cli(capsys, *words)
    if match == "CUDA" and "cuda" in err.lower() and code == 0:
        pytest.skip("a GPU is present")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddkit: error:") and match in lines[0]
    assert "Traceback" not in err


def test_baseline_eval_export_show_flow(capsys, tmp_path):
    out = tmp_path / "random"
    code, text, _ = run_cli(capsys, "baseline", "random", "--dataset", "digits", "--ipc", "3", "--out", str(out))
    assert code == 0 and str(out) in text and (out / "grid.png").is_file()
    code, text, _ = run_cli(capsys, "eval", str(out), "--preset", "smoke", "--runs", "2", "--quiet",
                            "--set", "epochs=5", "--arch", "convnet,mlp")
    assert code == 0 and "convnet" in text and "mlp" in text and "+-" in text
    evaluations = json.loads((out / "manifest.json").read_text())["evaluations"]
    assert [e["arch"] for e in evaluations] == ["convnet", "mlp"] and evaluations[0]["config"]["epochs"] == 5
    code, text, _ = run_cli(capsys, "eval", str(out), "--preset", "smoke", "--runs", "2", "--quiet",
                            "--set", "epochs=5", "--reuse")
    assert code == 0 and len(json.loads((out / "manifest.json").read_text())["evaluations"]) == 2
    code, text, _ = run_cli(capsys, "export", str(out), "--to", str(tmp_path / "png"))
    assert code == 0 and len(list((tmp_path / "png").glob("*/*.png"))) == 30
    (out / "grid.png").unlink()
    code, text, _ = run_cli(capsys, "show", str(out))
    assert code == 0 and text.strip() == str(out / "grid.png") and (out / "grid.png").is_file()


def test_a_set_in_out_is_not_replaced_without_overwrite(capsys, tmp_path, isolated_data):
    out = tmp_path / "set"
    assert run_cli(capsys, "baseline", "random", "--dataset", "digits", "--ipc", "1", "--out", str(out))[0] == 0
    record = {"protocol": "hard", "preset": "quick", "arch": "convnet", "accuracies": [50.0], "mean": 50.0, "std": 0.0}
    ddkit.load(out).record_evaluation(record)  # an hour of evaluation, in a real case
    for command in (["baseline", "random", "--dataset", "digits", "--ipc", "2"],
                    ["distill", "dm", "--dataset", "digits", "--ipc", "1", "--preset", "smoke", "--quiet"],
                    ["import", str(out / "data.safetensors"), "--dataset", "digits"]):
        code, _, err = run_cli(capsys, *command, "--out", str(out))
        assert code == 2 and "already holds a random set with 1 stored evaluation(s)" in err and "--overwrite" in err
    assert ddkit.load(out).meta["evaluations"][0]["mean"] == 50.0
    code, _, err = run_cli(capsys, "baseline", "random", "--dataset", "digits", "--ipc", "2", "--out", str(out),
                           "--overwrite")
    assert code == 0, err
    replaced = ddkit.load(out)
    assert replaced.ipc == 2 and not replaced.meta["evaluations"]


def test_distill_with_terms_from_the_command_line(capsys, tmp_path, isolated_data):
    out = tmp_path / "dm"
    code, text, err = run_cli(capsys, "distill", "dm", "--dataset", "digits", "--ipc", "2", "--preset", "smoke",
                              "--out", str(out), "--terms", "cm,style", "--weight", "style=2e3", "--quiet",
                              "--set", "iterations=2")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "dm" and manifest["ipc"] == 2
    weights = manifest["config"]["weights"]
    assert (weights["cm"], weights["style"], manifest["config"]["iterations"]) == (0.01, 2000.0, 2)
    assert set(manifest["loss_log"][-1]) == {"iteration", "mean", "cm", "style", "total"}
    assert manifest["timings"]["distill_seconds"] > 0 and manifest["peak_memory_bytes"] > 0


def test_damaged_set_is_refused_from_the_cli(capsys, tmp_path):
    out = tmp_path / "random"
    run_cli(capsys, "baseline", "random", "--dataset", "digits", "--ipc", "1", "--out", str(out))
    with open(out / "data.safetensors", "ab") as handle:
        handle.write(b"tampered")
    code, _, err = run_cli(capsys, "eval", str(out))
    assert code == 2 and "sha256" in err


def test_console_script_module_form():
    done = subprocess.run([sys.executable, "-m", "ddkit", "data", "list"], capture_output=True, text=True)
    assert done.returncode == 0 and "fashion-mnist" in done.stdout and "digits" in done.stdout


def test_compile_reaches_distill_recover_and_resume(tmp_path, monkeypatch):
    import ddkit

    class Called(Exception):
        pass

    seen = []

    def record(*args, **kwargs):
        seen.append(kwargs["compiled"])
        raise Called

    monkeypatch.setattr(ddkit, "distill", record)
    monkeypatch.setattr(ddkit, "resume", record)
    out = str(tmp_path / "set")
    for argv in (["distill", "dm", "--dataset", "digits", "--ipc", "1", "--out", out, "--compile"],
                 ["recover", "sre2l", "--dataset", "digits", "--ipc", "1", "--out", out, "--compile"],
                 ["distill", "--resume", out, "--compile"],
                 ["distill", "dm", "--dataset", "digits", "--ipc", "1", "--out", out]):
        with pytest.raises(Called):
            main(argv)
    assert seen == [True, True, True, False]
