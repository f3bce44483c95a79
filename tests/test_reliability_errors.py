"""File-system faults and out-of-range options end in one line, before any work where they can be
seen before it; --resume refuses options that contradict its checkpoint."""

import errno
import json
import os

import pytest
import torch

import ddkit
from ddkit.cli import main

DISTILL = ["distill", "dm", "--dataset", "digits", "--ipc", "1", "--preset", "smoke", "--quiet"]
BASELINE = ["baseline", "random", "--dataset", "digits", "--ipc", "1"]


def one_line(capsys, words, code=2):
    """Run the CLI; assert exit ``code`` and exactly one error line without a traceback; return it."""
    result = main([str(w) for w in words])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert result == code, err
    assert len(lines) == 1 and lines[0].startswith("ddkit: error:") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command gets as far as distilling or loading a dataset."""
    import ddkit.cli
    import ddkit.data

    def refuse(*args, **kwargs):
        raise AssertionError("work began before the bad --out was refused")

    monkeypatch.setattr(ddkit, "distill", refuse)
    monkeypatch.setattr(ddkit, "resume", refuse)
    monkeypatch.setattr(ddkit.data, "load_dataset", refuse)
    monkeypatch.setattr(ddkit.cli, "load_dataset", refuse)  # the name the CLI's commands call


# ---- 4. file-system faults -----------------------------------------------------------------------------
@pytest.mark.parametrize("command", [DISTILL, BASELINE, ["recover", "sre2l", "--dataset", "digits", "--ipc", "1"],
                                     ["import", "SOURCE", "--dataset", "digits"]])
@pytest.mark.parametrize("where", ["a file", "under a file", "a read-only place"])
def test_an_unwritable_out_is_refused_before_any_work(tmp_path, capsys, no_work, command, where):
    (tmp_path / "file").write_text("x")
    out = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "set",
           "a read-only place": "/sys/ddkit-test-set"}[where]
    command = [str(tmp_path / "source.npz") if w == "SOURCE" else w for w in command]
    line = one_line(capsys, [*command, "--out", out])
    assert str(out) in line or str(tmp_path / "file") in line


def test_relabel_in_place_and_bench_and_report_check_their_output_first(tmp_path, capsys, no_work, tiny_set):
    (tmp_path / "file").write_text("x")
    set_dir = tiny_set.save(tmp_path / "set")
    assert "file" in one_line(capsys, ["relabel", set_dir, "--out", tmp_path / "file" / "x"])
    assert "file" in one_line(capsys, ["bench", "--tier", "smoke", "--datasets", "digits", "--methods", "dm",
                                       "--ipc", "1", "--out", tmp_path / "file" / "bench"])
    assert "file" in one_line(capsys, ["report", set_dir, "--out", tmp_path / "file" / "r.html"])
    assert "file" in one_line(capsys, ["export", set_dir, "--to", tmp_path / "file" / "png"])


@pytest.mark.parametrize("fault, code, words", [
    (errno.EROFS, 2, "read-only"),
    (errno.ENOSPC, 2, "space"),
    (errno.EACCES, 2, "permission"),
    (errno.EIO, 1, "input/output"),
])
def test_a_fault_while_saving_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch, fault, code, words):
    import ddkit.store.distilled as store

    def failing_save(tensors, path, metadata=None):
        raise OSError(fault, os.strerror(fault), path)

    monkeypatch.setattr(store, "save_file", failing_save)
    out = tmp_path / "set"
    line = one_line(capsys, [*BASELINE, "--out", out], code=code)
    assert words in line.lower() and str(tmp_path) in line
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []  # nothing half-written


def test_a_safetensors_write_error_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    import ddkit.store.distilled as store
    from safetensors import SafetensorError

    def failing_save(tensors, path, metadata=None):
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at path "{path}"')

    monkeypatch.setattr(store, "save_file", failing_save)
    line = one_line(capsys, [*BASELINE, "--out", tmp_path / "set"])
    assert "space" in line.lower() and str(tmp_path) in line


def test_an_unwritable_ddkit_data_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("DDKIT_DATA", "/sys/ddkit-test-data")
    line = one_line(capsys, ["squeeze", "--dataset", "digits", "--arch", "convnet", "--preset", "smoke", "--quiet"])
    assert "/sys/ddkit-test-data" in line and "DDKIT_DATA" in line


def test_an_unexpected_os_error_keeps_its_traceback_when_asked(tmp_path, capsys, monkeypatch):
    import ddkit.store.distilled as store

    def failing_save(tensors, path, metadata=None):
        raise OSError(errno.EIO, os.strerror(errno.EIO), path)

    monkeypatch.setattr(store, "save_file", failing_save)
    monkeypatch.setenv("DDKIT_TRACEBACK", "1")
    with pytest.raises(OSError):
        main([*BASELINE, "--out", str(tmp_path / "set")])


# ---- 5. numeric options --------------------------------------------------------------------------------
@pytest.mark.parametrize("words, match", [
    ([*DISTILL, "--seed", str(2 ** 64)], "--seed"),
    ([*DISTILL, "--seed", str(2 ** 63)], "--seed"),
    ([*BASELINE, "--seed", str(2 ** 64)], "--seed"),
    (["eval", "SET", "--seed", str(2 ** 64)], "--seed"),
    (["eval", "SET", "--seed", str(2 ** 63 - 1), "--runs", "2"], "--seed"),
    ([*DISTILL, "--checkpoint-minutes", "inf"], "--checkpoint-minutes"),
    ([*DISTILL, "--checkpoint-minutes", "nan"], "--checkpoint-minutes"),
    ([*DISTILL, "--set", "model=5"], "model"),
    ([*DISTILL, "--set", "model.width=1e12"], "width"),
    ([*DISTILL, "--set", "model.width=1000000000000"], "width"),
    ([*DISTILL, "--set", "model.width=0"], "width"),
    (["eval", "SET", "--set", "model=5"], "model"),
    (["eval", "SET", "--set", "model.width=1e12"], "width"),
    (["eval", "SET", "--set", "epochs=inf"], "epochs"),
])
def test_out_of_range_numbers_are_one_line_before_work(tmp_path, capsys, digits, words, match):
    from ddkit.evaluate import random_subset

    set_dir = random_subset(digits, 1).save(tmp_path / "set")
    words = [str(set_dir) if w == "SET" else w for w in words]
    if words[0] != "eval":
        words += ["--out", str(tmp_path / "out")]
    line = one_line(capsys, words)
    assert match in line


def test_bench_ipc_above_a_class_is_a_permanent_input_error(tmp_path, capsys, isolated_data):
    line = one_line(capsys, ["bench", "--tier", "smoke", "--datasets", "digits", "--methods", "dm", "--ipc", "1000",
                             "--runs", "1", "--quiet", "--out", tmp_path / "bench"])
    assert "--ipc 1000" in line and "again" not in line
    assert not (tmp_path / "bench").exists()


# ---- 5b. --resume -------------------------------------------------------------------------------------
@pytest.fixture
def stopped_run(tmp_path, isolated_data):
    """A smoke DM run of 6 iterations on digits stopped after a checkpoint at iteration 3."""
    from ddkit import distributed

    out = tmp_path / "dm"

    class Stop(Exception):
        pass

    def fault(iteration):
        if iteration == 4:
            raise Stop

    original = distributed.maybe_inject_fault
    distributed.maybe_inject_fault = fault
    try:
        with pytest.raises(Stop):
            ddkit.distill("dm", dataset="digits", ipc=1, preset="smoke", out=out, show_progress=False,
                          overrides={"iterations": 6}, checkpoint_every=3)
    finally:
        distributed.maybe_inject_fault = original
    assert (out / "checkpoint" / "latest.json").is_file()
    return out


@pytest.mark.parametrize("extra, match", [
    (["--ipc", "2"], "--ipc"), (["--seed", "5"], "--seed"), (["--dataset", "mnist"], "--dataset"),
    (["--set", "iterations=9"], "--set"), (["--preset", "quick"], "--preset"), (["idm"], "idm"),
])
def test_resume_refuses_options_that_contradict_the_checkpoint(stopped_run, capsys, extra, match):
    method = [w for w in extra if not w.startswith("-") and "=" not in w and w in ("idm",)]
    options = [w for w in extra if w not in method]
    line = one_line(capsys, ["distill", *method, "--resume", stopped_run, *options, "--quiet"])
    assert match in line and "checkpoint" in line
    assert (stopped_run / "checkpoint" / "latest.json").is_file()  # nothing was run or removed


def test_resume_accepts_options_that_agree_and_reports_every_iteration(stopped_run, capsys):
    code = main(["distill", "dm", "--resume", str(stopped_run), "--ipc", "1", "--seed", "0", "--dataset", "digits",
                 "--preset", "smoke", "--set", "iterations=6", "--quiet"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((stopped_run / "manifest.json").read_text())
    assert manifest["iterations_done"] == 6 and manifest["resumed_at_iteration"] == 3


@pytest.mark.parametrize("edit", [
    lambda m: m.update(iteration="three"),
    lambda m: m.update(folder="../../elsewhere"),
    lambda m: m["run"].update(ipc="one"),
    lambda m: m["run"].update(seed=2 ** 70),
    lambda m: m.pop("run"),
    lambda m: m.update(world_size=0),
])
def test_an_edited_checkpoint_field_is_one_line(stopped_run, capsys, edit):
    marker = stopped_run / "checkpoint" / "latest.json"
    record = json.loads(marker.read_text())
    edit(record)
    marker.write_text(json.dumps(record))
    line = one_line(capsys, ["distill", "--resume", stopped_run, "--quiet"])
    assert "checkpoint" in line


def test_a_checkpoint_that_is_not_json_is_one_line(stopped_run, capsys):
    (stopped_run / "checkpoint" / "latest.json").write_bytes(b"\xff\xfe")
    assert "checkpoint" in one_line(capsys, ["distill", "--resume", stopped_run, "--quiet"])


def test_seed_range_in_the_python_api(tmp_path):
    with pytest.raises(ddkit.DDKitError, match="seed"):
        ddkit.distill("random", dataset="digits", ipc=1, seed=2 ** 64)
    generator = torch.Generator()
    generator.manual_seed(2 ** 63 - 1)  # the largest seed ddkit accepts is one torch accepts


def test_resume_names_the_option_that_contradicts_it(stopped_run, capsys):
    line = one_line(capsys, ["distill", "--resume", stopped_run, "--terms", "cm", "--teacher", stopped_run, "--quiet"])
    assert "--terms ['cm']" in line and "--teacher" in line


def test_fetching_a_dataset_that_needs_no_cache_does_not_need_a_writable_ddkit_data(capsys, monkeypatch):
    monkeypatch.setenv("DDKIT_DATA", "/sys/ddkit-test-data")
    assert main(["data", "fetch", "digits", "--quiet"]) == 0
    line = one_line(capsys, ["data", "fetch", "mnist", "--quiet"])
    assert "DDKIT_DATA" in line and "/sys/ddkit-test-data" in line


def test_a_model_larger_than_memory_is_refused_before_anything_is_allocated():
    from ddkit.models import create

    # 36 TB of weights: the size comes from a build on the meta device; a real build would fail to allocate
    with pytest.raises(ddkit.DDKitError, match="GiB of parameters, more than this machine's"):
        create("convnet", 1, 10, 28, width=10 ** 6)
