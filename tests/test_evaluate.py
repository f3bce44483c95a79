"""The hard-label evaluator and the random baseline on real data (digits, no fetch)."""

import pytest
import torch

import ddkit
from conftest import compiler_missing
from ddkit.errors import DDKitError
from ddkit.evaluate import evaluate, random_subset, resolve_config
from ddkit.models.training import train_classifier


def test_random_subset_is_per_class_and_seeded(digits):
    a = random_subset(digits, 5, seed=1)
    b = random_subset(digits, 5, seed=1)
    c = random_subset(digits, 5, seed=2)
    assert a.images.shape == (50, 1, 8, 8) and a.labels.tolist() == sorted(a.labels.tolist())
    assert torch.bincount(a.labels).tolist() == [5] * 10
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    index = torch.tensor(a.meta["source_indices"])
    assert torch.equal(digits.train.labels[index], a.labels)
    assert len(set(index.tolist())) == 50  # distinct images


def test_ipc_larger_than_a_class_is_refused(digits):
    with pytest.raises(DDKitError, match="larger than the smallest class"):
        random_subset(digits, 1000)
    with pytest.raises(DDKitError, match="positive integer"):
        random_subset(digits, 0)


def test_evaluator_trains_digits_subset_well_above_chance(digits, tmp_path):
    subset = random_subset(digits, 10, seed=0)
    subset.save(tmp_path / "r")
    results = evaluate(subset, preset="smoke", runs=2, show_progress=False, real=digits)
    result = results["convnet"]
    assert len(result.accuracies) == 2 and result.seeds == [0, 1]
    assert result.mean > 60.0  # chance is 10 %
    stored = ddkit.load(tmp_path / "r").meta["evaluations"][-1]
    assert stored["mean"] == pytest.approx(result.mean, abs=1e-3) and stored["preset"] == "smoke"


def test_evaluation_is_reproducible_and_reusable(digits):
    subset = random_subset(digits, 3, seed=0)
    overrides = {"epochs": 3}
    first = evaluate(subset, preset="smoke", runs=1, overrides=overrides, show_progress=False, real=digits)
    second = evaluate(subset, preset="smoke", runs=1, overrides=overrides, show_progress=False, real=digits)
    assert first["convnet"].accuracies == second["convnet"].accuracies
    before = torch.get_rng_state()
    reused = evaluate(subset, preset="smoke", runs=1, overrides=overrides, show_progress=False, real=digits,
                      reuse=True)
    assert reused["convnet"].date == second["convnet"].date  # came from the manifest, not retrained
    assert torch.equal(before, torch.get_rng_state())


def _stop_after(calls, function):
    """``function`` that raises KeyboardInterrupt on its ``calls``-th call (a run stopped mid-way)."""
    count = []

    def wrapped(*args, **kwargs):
        count.append(1)
        if len(count) == calls:
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return wrapped


def test_interrupted_evaluation_keeps_finished_runs_and_resumes(digits, tmp_path, monkeypatch):
    from ddkit.evaluate import protocols

    subset = random_subset(digits, 3, seed=0)
    subset.save(tmp_path / "r")
    overrides = {"epochs": 40, "lr": 0.05}
    whole = evaluate(subset, preset="smoke", runs=3, overrides=overrides, show_progress=False, real=digits,
                     record=False)["convnet"]

    real_train = protocols.train_classifier
    monkeypatch.setattr(protocols, "train_classifier", _stop_after(3, real_train))  # stopped in the third run
    with pytest.raises(KeyboardInterrupt):
        evaluate(ddkit.load(tmp_path / "r"), preset="smoke", runs=3, overrides=overrides, show_progress=False,
                 real=digits)
    records = ddkit.load(tmp_path / "r").meta["evaluations"]
    assert len(records) == 1 and records[0]["partial"] and records[0]["runs_planned"] == 3
    assert records[0]["seeds"] == [0, 1] and records[0]["accuracies"] == pytest.approx(whole.accuracies[:2], abs=1e-3)

    trained = []
    monkeypatch.setattr(protocols, "train_classifier", lambda *a, **k: (trained.append(k["desc"]), real_train(*a, **k))[1])
    resumed = evaluate(ddkit.load(tmp_path / "r"), preset="smoke", runs=3, overrides=overrides,
                       show_progress=False, real=digits, reuse=True)["convnet"]
    assert trained == ["eval convnet seed 2"]  # only the unfinished run trained again
    assert len(set(whole.accuracies)) == 3  # the seeds give different runs, so a mix-up would show
    assert resumed.accuracies == pytest.approx(whole.accuracies, abs=1e-3) and resumed.seeds == [0, 1, 2]
    records = ddkit.load(tmp_path / "r").meta["evaluations"]
    assert len(records) == 1 and "partial" not in records[0]  # the full record replaced the partial one
    assert records[0]["accuracies"] == pytest.approx(whole.accuracies, abs=1e-3)


def test_partial_runs_are_not_reused_without_reuse_or_under_other_settings(digits, monkeypatch):
    from ddkit.evaluate import protocols

    subset = random_subset(digits, 2, seed=0)
    overrides = {"epochs": 2}
    subset.record_evaluation({"protocol": "hard", "preset": "smoke", "arch": "convnet", "seeds": [0],
                              "accuracies": [99.0], "seconds_per_run": 1.0, "partial": True, "runs_planned": 2,
                              "config": resolve_config("hard", "smoke", {"epochs": 5})})
    stale = subset.meta["evaluations"][0]
    trained = []
    real_train = protocols.train_classifier
    monkeypatch.setattr(protocols, "train_classifier", lambda *a, **k: (trained.append(k["desc"]), real_train(*a, **k))[1])
    # Other settings (5 epochs, not 2): the partial run is not reused and stays.
    evaluate(subset, preset="smoke", runs=2, overrides=overrides, show_progress=False, real=digits, reuse=True)
    assert len(trained) == 2 and subset.meta["evaluations"][0] is stale
    # Same settings but reuse=False: trained again, and the new full record supersedes the partial one.
    trained.clear()
    result = evaluate(subset, preset="smoke", runs=2, overrides={"epochs": 5}, show_progress=False, real=digits)
    assert len(trained) == 2 and 99.0 not in result["convnet"].accuracies
    assert all(not rec.get("partial") for rec in subset.meta["evaluations"])


def test_a_stopped_training_run_continues_from_its_epoch_checkpoint_bit_for_bit(digits, tmp_path):
    from ddkit.augment import DSA
    from ddkit.evaluate import build_model
    from ddkit.models.training import RunCheckpoint
    from ddkit.utils import make_generator

    subset = random_subset(digits, 5, seed=0)
    images, labels = subset.images, subset.labels
    # 6 epochs of one batch, lr x0.1 (new optimiser) at epoch 3; BatchNorm so buffers must come back too
    config = dict(resolve_config("hard", "smoke"), epochs=6, lr=0.05)
    options = {"width": 16, "norm": "batch"}
    dsa = DSA("color_crop_cutout_flip_scale_rotate")

    whole = build_model("convnet", 1, 10, 8, options, 0, "cpu")
    whole_losses = train_classifier(whole, images, labels, config, make_generator(0), dsa=dsa)

    identity = {"run": "hard seed 0"}
    path = tmp_path / "ckpt" / "run.safetensors"
    stopped = build_model("convnet", 1, 10, 8, options, 0, "cpu")
    with pytest.raises(KeyboardInterrupt):  # stopped in epoch 4, after the decay
        train_classifier(stopped, images, labels, config, make_generator(0), dsa=_stop_after(5, dsa),
                         checkpoint=RunCheckpoint(path, identity, every_seconds=0))
    assert path.is_file()
    assert RunCheckpoint(path, {"run": "another"}).restore(stopped, make_generator(0)) is None

    resumed = build_model("convnet", 1, 10, 8, options, 99, "cpu")  # other weights: they must be restored
    checkpoint = RunCheckpoint(path, identity, every_seconds=0)
    losses = train_classifier(resumed, images, labels, config, make_generator(7), dsa=dsa, checkpoint=checkpoint)
    assert losses == whole_losses and checkpoint.seconds_before > 0
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    # The last epoch's checkpoint stays until the caller stored the result: from it, nothing is trained.
    assert path.is_file()
    finished = build_model("convnet", 1, 10, 8, options, 99, "cpu")
    assert train_classifier(finished, images, labels, config, make_generator(7), dsa=_stop_after(1, dsa),
                            checkpoint=RunCheckpoint(path, identity)) == whole_losses
    for name, value in whole.state_dict().items():
        assert torch.equal(value, finished.state_dict()[name]), name
    checkpoint.remove()
    assert not path.exists() and not path.parent.exists()


def _saved_subset_and_its_uninterrupted_evaluation(digits, path, runs: int):
    """Save a 5-per-class random subset at ``path``; return (the smoke overrides used, the
    :class:`EvalResult` of an unrecorded evaluation that nothing stops)."""
    subset = random_subset(digits, 5, seed=0)
    subset.save(path)
    overrides = {"epochs": 20, "lr": 0.05}  # about 50 % (fewer epochs stay at chance, which proves nothing)
    return overrides, evaluate(subset, preset="smoke", runs=runs, overrides=overrides, show_progress=False,
                               real=digits, record=False)["convnet"]


def test_evaluate_continues_a_stopped_run_with_reuse_and_restarts_it_without(digits, tmp_path, monkeypatch):
    from ddkit.evaluate import protocols

    overrides, whole = _saved_subset_and_its_uninterrupted_evaluation(digits, tmp_path / "r", runs=1)
    monkeypatch.setattr(protocols, "EVAL_CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every epoch
    real_train = protocols.train_classifier
    batches = []

    def train(stop_at):
        def wrapped(model, images, labels, config, generator, dsa=None, **kwargs):
            def counted(*args, **kw):
                batches.append(1)
                return dsa(*args, **kw)
            return real_train(model, images, labels, config, generator, dsa=_stop_after(stop_at, counted), **kwargs)
        return wrapped

    folder = tmp_path / "r" / protocols.EVAL_CHECKPOINT_DIR
    monkeypatch.setattr(protocols, "train_classifier", train(5))  # stopped in epoch 5 of 20 (one batch each)
    with pytest.raises(KeyboardInterrupt):
        evaluate(ddkit.load(tmp_path / "r"), preset="smoke", runs=1, overrides=overrides, show_progress=False,
                 real=digits)
    assert len(list(folder.iterdir())) == 1

    batches.clear()
    monkeypatch.setattr(protocols, "train_classifier", train(0))
    resumed = evaluate(ddkit.load(tmp_path / "r"), preset="smoke", runs=1, overrides=overrides, show_progress=False,
                       real=digits, reuse=True)["convnet"]
    assert len(batches) == 16 and resumed.accuracies == whole.accuracies  # epochs 5 to 20 only, same result
    assert whole.accuracies[0] > 30
    assert not folder.exists()

    # Without reuse a checkpoint left behind is not used: the run starts from its first epoch.
    monkeypatch.setattr(protocols, "train_classifier", train(5))
    with pytest.raises(KeyboardInterrupt):
        evaluate(ddkit.load(tmp_path / "r"), preset="smoke", runs=1, overrides=overrides, show_progress=False,
                 real=digits)
    batches.clear()
    monkeypatch.setattr(protocols, "train_classifier", train(0))
    again = evaluate(ddkit.load(tmp_path / "r"), preset="smoke", runs=1, overrides=overrides, show_progress=False,
                     real=digits)["convnet"]
    assert len(batches) == 20 and again.accuracies == whole.accuracies and not folder.exists()


def test_a_run_stopped_after_training_but_before_its_record_trains_nothing_again(digits, tmp_path, monkeypatch):
    from ddkit.evaluate import protocols

    overrides, whole = _saved_subset_and_its_uninterrupted_evaluation(digits, tmp_path / "r", runs=2)
    monkeypatch.setattr(protocols, "EVAL_CHECKPOINT_SECONDS", 3600.0)  # only the final checkpoint is written
    monkeypatch.setattr(protocols, "test_accuracy", _stop_after(2, protocols.test_accuracy))  # run 2, trained
    with pytest.raises(KeyboardInterrupt):
        evaluate(ddkit.load(tmp_path / "r"), preset="smoke", runs=2, overrides=overrides, show_progress=False,
                 real=digits)
    folder = tmp_path / "r" / protocols.EVAL_CHECKPOINT_DIR
    assert [p.name for p in folder.iterdir()] == ["hard-smoke-convnet-seed1.safetensors"]  # run 1's is gone

    trained = []
    real_train = protocols.train_classifier
    monkeypatch.setattr(protocols, "train_classifier", lambda *a, **k: trained.append(real_train(*a, **k)))
    resumed = evaluate(ddkit.load(tmp_path / "r"), preset="smoke", runs=2, overrides=overrides,
                       show_progress=False, real=digits, reuse=True)["convnet"]
    assert resumed.accuracies == pytest.approx(whole.accuracies, abs=1e-4)  # stored runs are rounded
    assert min(whole.accuracies) > 30 and len(trained) == 1 and not folder.exists()


def test_cross_architecture_table(digits):
    subset = random_subset(digits, 2, seed=0)
    results = evaluate(subset, preset="smoke", runs=1, archs=("convnet", "mlp"), overrides={"epochs": 2},
                       show_progress=False, real=digits)
    assert set(results) == {"convnet", "mlp"}


def test_bad_evaluation_requests(digits):
    subset = random_subset(digits, 2, seed=0)
    with pytest.raises(DDKitError, match="unknown protocol"):
        evaluate(subset, protocol="soft-ish", real=digits)
    with pytest.raises(DDKitError, match="unknown evaluation preset"):
        evaluate(subset, preset="huge", real=digits)
    with pytest.raises(DDKitError, match="unknown evaluation option"):
        evaluate(subset, preset="smoke", overrides={"epochz": 1}, real=digits)
    with pytest.raises(DDKitError, match="runs"):
        evaluate(subset, preset="smoke", runs=0, real=digits)
    with pytest.raises(DDKitError, match="unknown model"):
        evaluate(subset, preset="smoke", archs=("transformer",), overrides={"epochs": 1}, real=digits,
                 show_progress=False)


@pytest.mark.parametrize("overrides, message", [
    ({"epochs": "abc"}, "epochs='abc' is not valid; give an integer >= 1"),
    ({"epochs": 0}, "epochs=0 is not valid"),  # would train nothing and store a chance-level result
    ({"batch_size": -1}, "batch_size=-1 is not valid"),
    ({"lr": "fast"}, "lr='fast' is not valid; give a number > 0"),
    ({"momentum": 2}, "momentum=2 is not valid; give a number >= 0 and <= 1"),
    ({"decay_at": 2}, "decay_at=2 is not valid; give a number > 0 and <= 1"),
    ({"dsa": "maybe"}, "dsa='maybe' is not valid; give true or false"),
    ({"model": 3}, "model=3 is not valid; set model options one by one"),
])
def test_bad_hard_protocol_options_are_refused_before_training(digits, overrides, message):
    subset = random_subset(digits, 2, seed=0)
    with pytest.raises(DDKitError, match=message):
        evaluate(subset, preset="smoke", overrides=overrides, real=digits, show_progress=False)
    assert not subset.meta.get("evaluations")


def test_api_arguments_of_the_wrong_type_are_refused_or_read_as_on_the_command_line(digits):
    from ddkit.utils import override_items

    subset = random_subset(digits, 1, seed=0)
    with pytest.raises(DDKitError, match="--runs must be an integer"):
        evaluate(subset, preset="smoke", runs="2", real=digits)
    with pytest.raises(DDKitError, match="seed='x' is not valid"):
        evaluate(subset, preset="smoke", seed="x", real=digits)
    with pytest.raises(DDKitError, match="overrides must be a dict or a list"):
        evaluate(subset, preset="smoke", overrides=5, real=digits)
    assert override_items(["epochs=2", "model.width=8"]) == [("epochs", 2), ("model.width", 8)]
    # a string of architectures is split like --arch, not iterated letter by letter
    results = evaluate(subset, preset="smoke", runs=1, archs="mlp", overrides={"epochs": 1}, real=digits,
                       show_progress=False, record=False)
    assert list(results) == ["mlp"]


def test_number_and_flag_checks():
    from ddkit.utils import check_flag, check_number

    assert check_number("x", "a", 3, integer=True, minimum=1) == 3
    assert check_number("x", "b", 0.5, above=0, maximum=1) == 0.5
    for bad in (True, float("nan"), float("inf"), "1", None):
        with pytest.raises(DDKitError, match="is not valid; give a number"):
            check_number("x", "c", bad)
    with pytest.raises(DDKitError, match=r"x option d=2.0 is not valid; give an integer >= 1"):
        check_number("x", "d", 2.0, integer=True, minimum=1)
    assert check_flag("x", "e", False) is False
    with pytest.raises(DDKitError, match="give true or false"):
        check_flag("x", "f", 1)


def test_paper_protocol_settings():
    config = resolve_config("hard", "paper")
    assert (config["epochs"], config["lr"], config["momentum"], config["weight_decay"], config["batch_size"]) == (
        1000, 0.01, 0.9, 5e-4, 256)
    assert config["decay_at"] == 0.5 and config["decay_factor"] == 0.1 and config["dsa"]


def test_lr_decay_resets_momentum():
    """After the decay epoch a fresh optimiser is used: momentum buffers start from zero."""
    model = torch.nn.Linear(2, 2)
    seen = []
    original = torch.optim.SGD.__init__

    def spy(self, params, **kwargs):
        seen.append(kwargs["lr"])
        original(self, params, **kwargs)

    torch.optim.SGD.__init__ = spy
    try:
        images = torch.randn(8, 2).view(8, 2)
        train_classifier(model, images, torch.randint(0, 2, (8,)),
                         {"epochs": 4, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "batch_size": 4,
                          "decay_at": 0.5, "decay_factor": 0.1}, torch.Generator().manual_seed(0))
    finally:
        torch.optim.SGD.__init__ = original
    assert seen == pytest.approx([0.1, 0.01])


@pytest.mark.skipif(compiler_missing(), reason="torch.compile on the CPU needs a C++ compiler (g++); none here")
def test_compiled_training_is_the_same_computation_and_an_execution_detail(digits, tmp_path):
    from ddkit.augment import DSA
    from ddkit.evaluate import build_model
    from ddkit.utils import make_generator

    subset = random_subset(digits, 4, seed=0)  # 40 images in batches of 20: one batch shape, one compile
    config = dict(resolve_config("hard", "smoke"), epochs=3, lr=0.05, batch_size=20)
    options = {"width": 16, "norm": "batch"}
    trained = {}
    for compiled in (False, True):
        model = build_model("convnet", 1, 10, 8, options, 0, "cpu")
        losses = train_classifier(model, subset.images, subset.labels, config, make_generator(0),
                                  dsa=DSA("color_crop_cutout_flip_scale_rotate"), compiled=compiled)
        trained[compiled] = (losses, model.state_dict())
    assert trained[True][0] == pytest.approx(trained[False][0], rel=1e-4)  # fused kernels: rounding only
    for name, value in trained[False][1].items():
        assert torch.allclose(value.float(), trained[True][1][name].float(), atol=1e-4), name
    assert not any(name.startswith("_orig_mod") for name in trained[True][1])  # the plain module's state dict

    subset.save(tmp_path / "r")
    overrides = {"epochs": 3, "lr": 0.05, "batch_size": 20, "model": options}
    result = evaluate(ddkit.load(tmp_path / "r"), preset="smoke", runs=1, overrides=overrides, show_progress=False,
                      real=digits, compiled=True)["convnet"]
    record = ddkit.load(tmp_path / "r").meta["evaluations"][-1]
    assert result.compiled and record["compiled"] is True
    # Like the device, compiling is not part of what an evaluation is: an eager request reuses it.
    again = evaluate(ddkit.load(tmp_path / "r"), preset="smoke", runs=1, overrides=overrides, show_progress=False,
                     real=digits, reuse=True)["convnet"]
    assert again.date == record["date"] and again.compiled


def test_only_the_ddp_profiler_notice_of_compile_is_dropped():
    """Under torchrun, torch.compile of DDP's forward logs a profiler notice on every rank: dropped."""
    import logging

    from ddkit.models.training import _quiet_ddp_profiler_notice

    logger = logging.getLogger("torch._dynamo.variables.ctx_manager")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        _quiet_ddp_profiler_notice()
        _quiet_ddp_profiler_notice()  # once per process, however many evaluations it runs
        logger.warning("Profiler record function %s will be ignored", "<class record_function>")
        logger.warning("Profiler function %s will be ignored", "<class profile>")
        assert seen == ["Profiler function <class profile> will be ignored"]
        assert len(logger.filters) == 1
    finally:
        logger.removeHandler(handler)


def test_compile_without_a_compiler_is_one_line(monkeypatch, digits):
    import shutil

    from ddkit.models.training import check_compile_available

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DDKitError, match="needs a C.. compiler .*drop --compile"):
        evaluate(random_subset(digits, 1, seed=0), preset="smoke", runs=1, show_progress=False, real=digits,
                 compiled=True)
    with pytest.raises(DDKitError, match="needs a C.. compiler"):
        check_compile_available("cpu")
    with pytest.raises(DDKitError, match="needs a C.. compiler .*drop --compile"):
        ddkit.distill("dm", dataset="digits", ipc=1, preset="smoke", show_progress=False, compiled=True)
    # the random subset has nothing to compile: the flag is ignored rather than refused
    assert "compiled" not in ddkit.distill("random", dataset="digits", ipc=1, show_progress=False, compiled=True).meta
