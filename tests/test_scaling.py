"""Scale-out and resilience: class-split torchrun runs, checkpoints, SIGKILL and dying-rank recovery."""

import json
import os
import subprocess
import sys

import pytest
import torch

import ddkit
from ddkit.cli import main
from ddkit.distributed import World
from ddkit.errors import DDKitError
from ddkit.store.distilled import SHARD_FOLDER

RUN = ["dm", "--dataset", "digits", "--ipc", "2", "--preset", "smoke", "--set", "iterations=12", "-q"]


@pytest.fixture
def env(isolated_data, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("DDKIT_FAULT_AT_ITERATION", "DDKIT_FAULT_RANK", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    return isolated_data


@pytest.fixture
def uninterrupted(env):
    """The reference: the same run in one process, never interrupted."""
    return ddkit.distill("dm", dataset="digits", ipc=2, preset="smoke", overrides=["iterations=12"],
                         show_progress=False).images


def test_shares_partition_the_classes_in_order():
    for size in (1, 2, 3, 4):
        shares = [World(rank, size).share(10) for rank in range(size)]
        assert sum(shares, []) == list(range(10))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_teardown_waits_until_gloo_lets_go_of_its_last_collective(monkeypatch, backend):
    # Gloo's worker thread frees a finished collective a moment after the caller sees it finish;
    # freed after Python began to exit, it aborts the process (ddkit.distributed._last_sync). The
    # fake all-reduce keeps a view of its tensor (a reference to it) for 50 ms on another thread.
    import threading

    import torch.distributed as dist

    from ddkit import distributed

    calls, held = [], []

    def all_reduce(tensor, *args, **kwargs):
        calls.append(("all_reduce", tensor.numel()))
        held.append(tensor.view(-1))
        threading.Timer(0.05, held.clear).start()

    monkeypatch.setattr(distributed, "_WORLD", World(0, 2))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(dist, "barrier", lambda *args, **kwargs: calls.append("barrier"))
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "destroy_process_group", lambda *args: calls.append(("destroy", len(held))))
    distributed.teardown()
    # gloo: no barrier (it would keep the run's last all-reduces alive), and nothing held at exit
    assert calls == ([("all_reduce", 1), ("destroy", 0)] if backend == "gloo" else ["barrier", ("destroy", 0)])
    assert not distributed.current().distributed


def test_two_gloo_processes_give_the_one_process_result(env, uninterrupted):
    out = env / "two"
    assert main(["distill", *RUN, "--out", str(out), "--nproc", "2"]) == 0
    merged = ddkit.load(out)
    assert torch.equal(merged.images, uninterrupted)  # instance norm: the class split is exact
    assert merged.meta["processes"] == 2 and not (out / ".parts").exists() and not (out / "checkpoint").exists()


def test_idm_per_class_steps_split_over_two_processes_give_the_one_process_result(env):
    """IDM steps its images class by class with one momentum optimiser: every rank takes every
    class's step (zero gradients for classes it does not own), so the split stays exact."""
    run = ["idm", "--dataset", "digits", "--ipc", "1", "--preset", "smoke", "--set", "iterations=4", "-q"]
    assert main(["distill", *run, "--out", str(env / "two"), "--nproc", "2"]) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker runs (OMP_NUM_THREADS=1): the queue's training reduces per thread
    try:
        one = ddkit.distill("idm", dataset="digits", ipc=1, preset="smoke", overrides=["iterations=4"],
                            show_progress=False)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ddkit.load(env / "two").images, one.images)


def test_sigkill_mid_run_then_resume_loses_nothing(env, uninterrupted):
    out = env / "killed"
    command = [sys.executable, "-m", "ddkit", "distill", *RUN, "--out", str(out), "--checkpoint-every", "3"]
    killed = subprocess.run(command, env={**os.environ, "DDKIT_FAULT_AT_ITERATION": "8"}, capture_output=True)
    assert killed.returncode == -9  # SIGKILL: no handler, no cleanup
    latest = json.loads((out / "checkpoint" / "latest.json").read_text())
    assert latest["iteration"] == 6 and not (out / "manifest.json").exists()
    with pytest.raises(DDKitError, match="unfinished run; continue it with --resume"):
        ddkit.distill("dm", dataset="digits", ipc=2, preset="smoke", overrides=["iterations=12"], out=out,
                      show_progress=False)
    assert main(["distill", "--resume", str(out), "-q"]) == 0
    assert torch.equal(ddkit.load(out).images, uninterrupted)
    assert not (out / "checkpoint").exists()


def test_a_dying_rank_fails_the_job_and_resume_completes_it(env, uninterrupted, monkeypatch, capsys):
    out = env / "dying"
    monkeypatch.setenv("DDKIT_FAULT_AT_ITERATION", "7")
    monkeypatch.setenv("DDKIT_FAULT_RANK", "1")
    assert main(["distill", *RUN, "--out", str(out), "--nproc", "2", "--checkpoint-every", "2"]) == 2
    err = capsys.readouterr().err
    assert "ddkit: error: a worker of the 2-process run failed" in err and f"--resume {out}" in err
    assert json.loads((out / "checkpoint" / "latest.json").read_text())["world_size"] == 2
    monkeypatch.delenv("DDKIT_FAULT_AT_ITERATION")
    # resumed with a different process count: every part of the checkpoint is read
    assert main(["distill", "--resume", str(out), "-q"]) == 0
    assert torch.equal(ddkit.load(out).images, uninterrupted)


def explode_at_the_sixth_call(monkeypatch, module, name: str) -> None:
    """Patch the loss function ``module.name`` so that its sixth call returns infinity."""
    calls = {"n": 0}
    real_loss = getattr(module, name)

    def explode_at_the_sixth(*args, **kwargs):
        calls["n"] += 1
        value = real_loss(*args, **kwargs)
        return value * float("inf") if calls["n"] == 6 else value

    monkeypatch.setattr(module, name, explode_at_the_sixth)


def test_non_finite_loss_keeps_the_last_good_checkpoint(env, monkeypatch):
    import ddkit.methods.matching as matching

    explode_at_the_sixth_call(monkeypatch, matching, "mean_feature_loss")
    out = env / "nan"
    with pytest.raises(DDKitError, match="iteration 5.*last checkpoint is kept"):
        ddkit.distill("dm", dataset="digits", ipc=2, preset="smoke", overrides=["iterations=12"], out=out,
                      checkpoint_every=2, show_progress=False)
    assert json.loads((out / "checkpoint" / "latest.json").read_text())["iteration"] == 4


def test_resume_needs_a_checkpoint_and_a_checkpointing_method(env):
    with pytest.raises(DDKitError, match="no checkpoint in"):
        ddkit.resume(env / "nothing")
    with pytest.raises(DDKitError, match="random does not checkpoint"):
        ddkit.distill("random", dataset="digits", ipc=1, out=env / "x", resume=True)


# ---- the statistics family: per-batch recover checkpoints ---------------------------------------------
# 4 batches of 5 images, 8 iterations each; rank-local steps count on across batches (batch 1 starts at 8).
# EMA: more state; per batch, so that a batch's images do not depend on which process recovered it
RECOVER = ["sre2l", "--dataset", "digits", "--ipc", "2", "--preset", "smoke", "--set", "batch_size=5",
           "--set", "iterations=8", "--set", "ema_alpha=0.5", "--set", "ema_scope=batch", "--set", "relabel.epochs=2",
           "-q"]


@pytest.fixture
def recovered(env):
    """The reference SRe2L set: one process, never interrupted."""
    assert main(["distill", *RECOVER, "--out", str(env / "reference")]) == 0
    return ddkit.load(env / "reference")


def assert_same_set(got, want):
    assert torch.equal(got.images, want.images)
    assert torch.equal(got.extras["relabel.logits"], want.extras["relabel.logits"])
    assert got.meta["loss_log"] == want.meta["loss_log"]


def test_recover_killed_mid_batch_resumes_the_batch_exactly(env, recovered):
    out = env / "killed"
    command = [sys.executable, "-m", "ddkit", "distill", *RECOVER, "--out", str(out), "--checkpoint-every", "3"]
    killed = subprocess.run(command, env={**os.environ, "DDKIT_FAULT_AT_ITERATION": "13"}, capture_output=True)
    assert killed.returncode == -9
    root = out / "checkpoint"
    assert json.loads((root / "latest.json").read_text())["kind"] == "batches"
    assert sorted(p.name for p in (root / "done").iterdir()) == ["batch-000000.safetensors"]
    assert sorted(p.name for p in (root / "running").iterdir()) == ["batch-000001.safetensors"]
    with pytest.raises(DDKitError, match="unfinished run; continue it with --resume"):
        ddkit.distill("sre2l", dataset="digits", ipc=2, preset="smoke", out=out,
                      overrides=["batch_size=5", "iterations=8", "ema_alpha=0.5", "relabel.epochs=2"], show_progress=False)
    assert main(["distill", "--resume", str(out), "-q"]) == 0  # x, Adam, RNG, EMA and log from iteration 3
    assert_same_set(ddkit.load(out), recovered)
    assert not root.exists()


def test_recover_dying_rank_then_resume_in_one_process(env, recovered, monkeypatch, capsys):
    out = env / "dying"
    monkeypatch.setenv("DDKIT_FAULT_AT_ITERATION", "13")  # rank 1: batches 1 and 3; dies in batch 3
    monkeypatch.setenv("DDKIT_FAULT_RANK", "1")
    assert main(["distill", *RECOVER, "--out", str(out), "--nproc", "2", "--checkpoint-every", "2"]) == 2
    assert f"ddkit distill --resume {out} --nproc 2" in capsys.readouterr().err
    assert (out / "checkpoint" / "done" / "batch-000001.safetensors").is_file()
    monkeypatch.delenv("DDKIT_FAULT_AT_ITERATION")
    assert main(["distill", "--resume", str(out), "-q"]) == 0  # batches keyed by number, not by process
    assert_same_set(ddkit.load(out), recovered)


def test_recover_only_resumes_without_relabelling(env, monkeypatch):
    out = env / "recover-only"
    command = [sys.executable, "-m", "ddkit", "recover", *RECOVER, "--out", str(out), "--checkpoint-every", "4"]
    killed = subprocess.run(command, env={**os.environ, "DDKIT_FAULT_AT_ITERATION": "20"}, capture_output=True)
    assert killed.returncode == -9
    assert main(["recover", "--resume", str(out), "-q"]) == 0
    resumed = ddkit.load(out)
    assert not resumed.has_soft_labels and resumed.images.shape == (20, 1, 8, 8)
    assert main(["recover", *RECOVER, "--out", str(env / "whole")]) == 0
    assert torch.equal(resumed.images, ddkit.load(env / "whole").images)


def test_recover_non_finite_loss_keeps_the_batch_checkpoint(env, monkeypatch):
    import ddkit.methods.recover as recover

    explode_at_the_sixth_call(monkeypatch, recover, "densification_loss")
    out = env / "nan"
    with pytest.raises(DDKitError, match="iteration 5 of batch 0.*last checkpoint is kept"):
        ddkit.distill("sre2l", dataset="digits", ipc=2, preset="smoke", out=out, checkpoint_every=2,
                      overrides=["batch_size=5", "iterations=8", "densify_weight=1"], show_progress=False)
    state = (out / "checkpoint" / "running" / "batch-000000.safetensors")
    from safetensors import safe_open
    with safe_open(str(state), framework="pt") as handle:
        assert json.loads(handle.metadata()["state"])["iteration"] == 4


def test_recover_batches_split_across_two_processes_give_the_one_process_set(env):
    options = ["--dataset", "digits", "--ipc", "2", "--preset", "smoke", "--set", "batch_size=5",
               "--set", "relabel.epochs=2", "-q"]
    assert main(["distill", "sre2l", *options, "--out", str(env / "one")]) == 0
    assert main(["distill", "sre2l", *options, "--out", str(env / "two"), "--nproc", "2"]) == 0
    one, two = ddkit.load(env / "one"), ddkit.load(env / "two")
    assert torch.equal(one.images, two.images)  # 4 batches, 2 per rank, each with its own generator
    assert torch.equal(one.extras["relabel.logits"], two.extras["relabel.logits"])
    assert one.meta["loss_log"] == two.meta["loss_log"]  # every rank's batches, merged in batch order


def test_squeeze_and_evaluation_under_two_processes_with_ddp(env, digits):
    assert main(["squeeze", "--dataset", "digits", "--arch", "convnet", "--model", "width=8", "--model", "norm=batch",
                 "--preset", "smoke", "--set", "epochs=3", "--nproc", "2", "-q"]) == 0
    manifests = list(env.glob("teachers/digits/*/manifest.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["test_accuracy"] > 30
    out = env / "random"
    assert main(["baseline", "random", "--dataset", "digits", "--ipc", "5", "--out", str(out)]) == 0
    assert main(["eval", str(out), "--preset", "smoke", "--runs", "1", "--nproc", "2", "-q"]) == 0
    records = ddkit.load(out).meta["evaluations"]
    assert len(records) == 1 and records[0]["mean"] > 30  # one record, written by rank 0 only
    # epoch checkpoints were written by rank 0 and removed once the teacher and the record were stored
    assert not list(env.glob("teachers/digits/*/training.safetensors")) and not (out / "eval-checkpoint").exists()


# ---- data-parallel training: DDP slices, whole-batch gradients, per-process or synced BatchNorm ------
WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def _launch(mode: str, out, nproc: int, **env) -> subprocess.CompletedProcess:
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run([sys.executable, *launcher, WORKER, mode, str(out)], capture_output=True, text=True,
                          env={**os.environ, **env})


def _why_it_failed(finished: subprocess.CompletedProcess) -> str:
    """A failed launch's exit status, the workers' own error lines (which the launcher's summary at
    the end of stderr pushes out of a plain tail) and that tail."""
    marks = ("terminate", "Error", "error", "Abort", "Traceback", "Signal")
    lines = [line for line in finished.stderr.splitlines() if any(mark in line for mark in marks)]
    return f"exit {finished.returncode}; " + "\n".join(lines[:40]) + "\n... " + finished.stderr[-1500:]


def _trained(mode: str, out, nproc: int) -> dict:
    from safetensors.torch import load_file

    finished = _launch(mode, out, nproc)
    assert finished.returncode == 0, _why_it_failed(finished)
    return load_file(str(out))


def _largest_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_two_process_training_equals_one_process(env, tmp_path, mode):
    # 60 samples in batches of 25: the last batch splits 5 + 5, the others 13 + 12 (loss factors != 1)
    one, two = _trained(mode, tmp_path / "one", 1), _trained(mode, tmp_path / "two", 2)
    assert _largest_difference(one, two) < 1e-4  # float summation order only


def test_batch_norm_statistics_are_per_process_unless_synced(env, tmp_path):
    one = _trained("hard-bn", tmp_path / "one", 1)
    per_process = _trained("hard-bn", tmp_path / "per-process", 2)
    synced = _trained("hard-bn-sync", tmp_path / "synced", 2)
    assert _largest_difference(one, per_process) > 1e-3  # each rank normalised its half of the batch
    assert _largest_difference(one, synced) < 1e-4  # running statistics included


def test_a_stopped_two_process_run_continues_from_rank_0s_epoch_checkpoint_exactly(env, tmp_path):
    import shutil

    from safetensors.torch import load_file

    never_stopped = _trained("hard-bn", tmp_path / "whole", 2)
    out = tmp_path / "stopped"
    stopped = _launch("hard-bn-checkpointed", out, 2, STOP_AFTER_SAVES="2")  # after epoch 2 of 4, before the decay
    assert stopped.returncode != 0 and not out.exists() and (tmp_path / "stopped.ckpt").is_file()
    shutil.copy(tmp_path / "stopped.ckpt", tmp_path / "own.ckpt0")  # for the next check: rank 1 finds none

    finished = _launch("hard-bn-checkpointed", out, 2)
    assert finished.returncode == 0, _why_it_failed(finished)
    assert "rank 0 resumed at epoch 2" in finished.stderr and "rank 1 resumed at epoch 2" in finished.stderr
    resumed = load_file(str(out))
    # Bit for bit, BatchNorm running statistics included: rank 1 restored rank 0's, which never enter training.
    assert sorted(resumed) == sorted(never_stopped)
    for name, value in never_stopped.items():
        assert torch.equal(value, resumed[name]), name

    split = _launch("hard-bn-own-checkpoints", tmp_path / "own", 2)
    assert split.returncode != 0 and "did not all find the epoch checkpoint" in split.stderr


def test_synced_batch_norm_keeps_the_state_dict_and_is_plain_batch_norm_in_one_process():
    from ddkit.models import create
    from ddkit.models.training import GlobalBatchNorm2d, synced_batch_norm

    model = create("convnet", in_channels=1, num_classes=10, image_size=8, width=8, norm="batch")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 1, 8, 8)
    expected = model.train()(x)
    synced = synced_batch_norm(model)
    assert any(isinstance(m, GlobalBatchNorm2d) for m in synced.modules())
    assert sorted(synced.state_dict()) == sorted(before)
    synced.load_state_dict(before)
    assert torch.allclose(synced.train()(x), expected, atol=1e-6)


@pytest.mark.parametrize("shards", [0, 1], ids=["one-tensor", "sharded"])
def test_relabel_split_across_two_processes_gives_the_one_process_records(env, shards):
    out = env / "random"
    assert main(["baseline", "random", "--dataset", "digits", "--ipc", "3", "--out", str(out)]) == 0
    options = ["--like", "sre2l", "--preset", "smoke", "--set", "relabel.epochs=3", "--set", "relabel.batch_size=7",
               "--set", f"relabel.shard_epochs={shards}", "-q"]
    assert main(["relabel", str(out), *options, "--out", str(env / "one")]) == 0
    assert main(["relabel", str(out), *options, "--out", str(env / "two"), "--nproc", "2"]) == 0
    one, two = ddkit.load(env / "one"), ddkit.load(env / "two")
    assert one.extras.keys() == two.extras.keys()
    assert all(torch.equal(one.extras[key], two.extras[key]) for key in one.extras)
    if shards:  # three shards of one epoch: rank 0 wrote two, rank 1 one, all listed and in the set
        listed = two.meta["relabel"]["shards"]
        assert [entry["epochs"] for entry in listed] == [[0, 1], [1, 2], [2, 3]]
        assert listed == one.meta["relabel"]["shards"]
        assert sorted(p.name for p in (env / "two" / SHARD_FOLDER).iterdir()) == [e["file"] for e in listed]
    else:
        assert "relabel.logits" in two.extras and two.extras["relabel.logits"].abs().sum() > 0
