"""One writer at a time per set: concurrent evaluations keep every record, a re-save keeps what
others recorded meanwhile, and two runs into one --out cannot both win (real processes)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ddkit
from ddkit.cli import main
from ddkit.store import load

SRC = str(Path(ddkit.__file__).resolve().parents[1])


def ddkit_process(*words, env=None):
    """``python -m ddkit WORDS`` as its own process, one thread, this checkout's ddkit."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "ddkit", *map(str, words)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_three_concurrent_evaluations_keep_all_three_records(tmp_path, isolated_data):
    out = tmp_path / "random"
    assert main(["baseline", "random", "--dataset", "digits", "--ipc", "1", "--out", str(out)]) == 0
    runs = [ddkit_process("eval", out, "--preset", "smoke", "--runs", "1", "--seed", seed, "--set", "epochs=10",
                          "--quiet") for seed in (0, 1, 2)]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
    records = load(out).meta["evaluations"]
    assert sorted(rec["seeds"][0] for rec in records) == [0, 1, 2]
    assert not any(rec.get("partial") for rec in records)


def test_a_resave_keeps_an_evaluation_recorded_since_it_loaded(tmp_path, tiny_set):
    out = tiny_set.save(tmp_path / "set")
    mine, theirs = load(out), load(out)
    theirs.record_evaluation({"protocol": "hard", "arch": "convnet", "mean": 50.0})
    mine.meta["note"] = "re-saved"
    mine.save(out)  # e.g. `ddkit relabel` in place, which loaded the set before the evaluation ended
    again = load(out)
    assert again.meta["note"] == "re-saved" and [e["mean"] for e in again.meta["evaluations"]] == [50.0]


def test_records_merge_with_what_another_process_stored_meanwhile(tmp_path, tiny_set):
    out = tiny_set.save(tmp_path / "set")
    first, second = load(out), load(out)
    first.record_evaluation({"protocol": "hard", "arch": "convnet", "mean": 50.0, "partial": True})
    second.record_evaluation({"protocol": "hard", "arch": "mlp", "mean": 40.0})
    partial = first.meta["evaluations"][0]
    first.record_evaluation({"protocol": "hard", "arch": "convnet", "mean": 51.0}, replacing=[partial])
    assert sorted(e["mean"] for e in load(out).meta["evaluations"]) == [40.0, 51.0]


def _wait_for(predicate, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_a_second_distillation_into_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys, isolated_data):
    from ddkit.store.distilled import set_lock_path

    out = tmp_path / "dm"
    first = ddkit_process("distill", "dm", "--dataset", "digits", "--ipc", "1", "--preset", "smoke", "--out", out,
                          "--set", "iterations=100000", "--quiet", env={"DDKIT_DATA": str(isolated_data)})
    try:
        _wait_for(lambda: set_lock_path(out, "run").is_file() or first.poll() is not None, 120,
                  "the first distillation to start")
        assert first.poll() is None, first.communicate()[1]
        code = main(["distill", "dm", "--dataset", "digits", "--ipc", "1", "--preset", "smoke", "--out", str(out),
                     "--set", "iterations=2", "--quiet", "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "another ddkit process" in err and str(first.pid) in err, err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not (out / "manifest.json").exists()  # the refused run wrote nothing


def test_the_lock_is_free_again_after_its_holder_is_killed(tmp_path, tiny_set, isolated_data):
    from ddkit.store.distilled import set_lock

    out = tiny_set.save(tmp_path / "set")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from ddkit.store.distilled import set_lock\n"
        "with set_lock(sys.argv[2], 'test holder'):\n    print('held', flush=True); time.sleep(600)"), SRC, str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ddkit.DDKitError, match="another ddkit process"):
            with set_lock(out, "second", wait=False):
                pass
    finally:
        holder.kill()
        holder.wait()
    with set_lock(out, "after the kill", wait=False):  # flock ends with its process
        tiny_set.record_evaluation({"protocol": "hard", "mean": 1.0})
    assert json.loads((out / "manifest.json").read_text())["evaluations"][-1]["mean"] == 1.0
