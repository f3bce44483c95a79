"""Squeeze, recover and the statistics-matching presets (SRe2L, CDA, G-VBSM) on real digits."""

import json

import pytest
import torch
import torch.nn as nn

import ddkit
from ddkit.cli import main
from ddkit.errors import DDKitError
from ddkit.losses.statistics import bn_statistics
from ddkit.methods import stats_family
from ddkit.losses.statistics import conv_statistics
from ddkit.methods.recover import (
    RecoverEngine,
    StatisticsHooks,
    capture_inputs,
    item_order,
    patch_cells_for,
    real_conv_targets,
)
from ddkit.methods.squeeze import load_teacher, squeeze
from ddkit.utils import normalize

CPU = torch.device("cpu")
TEACHER = {"arch": "convnet", "width": 8, "norm": "batch", "depth": None}


@pytest.fixture(scope="module")
def teacher(digits, tmp_path_factory):
    import os

    old = os.environ.get("DDKIT_DATA")
    os.environ["DDKIT_DATA"] = str(tmp_path_factory.mktemp("teachers"))
    try:
        yield squeeze(digits, TEACHER, preset="smoke", show_progress=False)
    finally:
        if old is None:
            os.environ.pop("DDKIT_DATA")
        else:
            os.environ["DDKIT_DATA"] = old


def config(method="sre2l", **recover):
    cfg = stats_family.resolve_preset(method, "digits", 10, "smoke")
    cfg["recover"].update(recover)
    return cfg


def test_squeeze_trains_caches_and_reloads(teacher, digits, monkeypatch):
    assert teacher.test_accuracy > 80  # a real teacher, not chance (10 %)
    manifest = json.loads((teacher.path / "manifest.json").read_text())
    assert manifest["dataset"] == "digits" and manifest["num_classes"] == 10 and manifest["model"] == TEACHER
    import ddkit.methods.squeeze as squeeze_module

    monkeypatch.setenv("DDKIT_DATA", str(teacher.path.parents[2]))
    monkeypatch.setattr(squeeze_module, "train_classifier", lambda *a, **k: pytest.fail("retrained a cached teacher"))
    again = squeeze(digits, TEACHER, preset="smoke", show_progress=False)
    assert again.path == teacher.path
    for a, b in zip(teacher.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_stopped_squeeze_continues_from_its_epoch_checkpoint(teacher, digits, tmp_path, monkeypatch):
    import ddkit.methods.squeeze as squeeze_module
    from ddkit.models.training import RunCheckpoint

    saves, restored = [], []

    class StopAfterTwoEpochs(RunCheckpoint):
        def __init__(self, path, identity, every_seconds=0.0):
            super().__init__(path, identity, 0.0)

        def maybe_save(self, *args, **kwargs):
            wrote = super().maybe_save(*args, **kwargs)
            saves.append(self.path)
            if len(saves) == 2 and not restored[-1]:  # the first squeeze only
                raise KeyboardInterrupt
            return wrote

        def restore(self, *args, **kwargs):
            restored.append(super().restore(*args, **kwargs))
            return restored[-1]

    monkeypatch.setenv("DDKIT_DATA", str(tmp_path))
    monkeypatch.setattr(squeeze_module, "RunCheckpoint", StopAfterTwoEpochs)
    with pytest.raises(KeyboardInterrupt):
        squeeze(digits, TEACHER, preset="smoke", show_progress=False)
    assert saves[-1].is_file() and not (saves[-1].parent / "model.safetensors").exists()

    resumed = squeeze(digits, TEACHER, preset="smoke", show_progress=False)
    assert restored[-1] is not None and restored[-1][1]["next_epoch"] == 2  # went on from epoch 3 of 6
    assert not saves[-1].exists()
    for a, b in zip(teacher.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)  # the same weights as the squeeze that was never stopped


def test_a_compiled_squeeze_trains_compiled_and_shares_the_eager_cache_entry(digits, tmp_path, monkeypatch):
    import ddkit.methods.squeeze as squeeze_module

    monkeypatch.setenv("DDKIT_DATA", str(tmp_path))
    passed = []
    real_train = squeeze_module.train_classifier

    def recorded(*args, **kwargs):  # what squeeze asks for, trained eagerly to keep the test fast
        passed.append(kwargs["compiled"])
        return real_train(*args, **dict(kwargs, compiled=False))

    monkeypatch.setattr(squeeze_module, "train_classifier", recorded)
    compiled = squeeze(digits, TEACHER, preset="smoke", overrides=["epochs=2"], show_progress=False, compiled=True)
    assert passed == [True] and json.loads((compiled.path / "manifest.json").read_text())["compiled"] is True
    # Compiling is an execution detail: the same recipe finds the same cache entry, trained once.
    eager = squeeze(digits, TEACHER, preset="smoke", overrides=["epochs=2"], show_progress=False)
    assert passed == [True] and eager.path == compiled.path


def test_a_teacher_another_process_is_training_is_waited_for_then_loaded(digits, tmp_path, monkeypatch):
    import threading
    import ddkit.methods.squeeze as squeeze_module

    monkeypatch.setenv("DDKIT_DATA", str(tmp_path))
    schedule = squeeze_module.squeeze_config("smoke", ["epochs=2"])
    recipe = squeeze_module.recipe_for(digits, TEACHER, schedule, 0)
    folder = squeeze_module.cache_folder("teachers", digits, recipe)
    trained = []
    real_train = squeeze_module.train_classifier
    monkeypatch.setattr(squeeze_module, "train_classifier", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    at_the_lock = threading.Event()
    import ddkit.utils as utils_module  # the cache's lock (utils.holding_lock) takes utils.lock_file

    real_lock_file = utils_module.lock_file

    def lock_file(path, wait=True):
        if threading.current_thread() is waiting:
            at_the_lock.set()
        return real_lock_file(path, wait)

    monkeypatch.setattr(utils_module, "lock_file", lock_file)
    asked = []
    waiting = threading.Thread(target=lambda: asked.append(
        squeeze(digits, TEACHER, preset="smoke", overrides=["epochs=2"], show_progress=False)))
    with squeeze_module._training_lock(folder):  # the other process, training this very teacher
        waiting.start()
        assert at_the_lock.wait(timeout=60)  # it found no cached teacher and asked for the lock...
        assert not asked  # ...which it cannot get while the other one trains
        squeeze_module._train_into_cache(folder, digits, TEACHER, schedule, recipe, 0, "cpu", "teachers", False,
                                         "squeeze", False)
    waiting.join(timeout=60)
    assert trained == [1] and asked[0].path == folder  # loaded what the other one saved


def test_teacher_for_another_dataset_is_refused(teacher, digits, tmp_path):
    import shutil

    copy = tmp_path / "teacher"
    shutil.copytree(teacher.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.update(dataset="mnist", num_classes=10, image_shape=[1, 28, 28])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DDKitError, match="trained for 'mnist'.*squeeze a teacher for digits"):
        load_teacher(copy, digits)
    manifest.update(dataset="digits", num_classes=3, image_shape=[1, 8, 8])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DDKitError, match="3 classes"):
        load_teacher(copy, digits)
    with pytest.raises(DDKitError, match="not a teacher folder"):
        load_teacher(tmp_path, digits)


def test_capture_inputs_sees_every_bn_input_and_leaves_no_hooks(teacher, digits):
    x = normalize(digits.train.images[:16].float() / 255, digits.mean, digits.std)
    with capture_inputs(teacher.model, (nn.BatchNorm2d,)) as taps:
        teacher.model(x)
    bns = [m for m in teacher.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m for m, _ in taps] == bns and taps[0][1].shape[1] == 8
    assert all(not m._forward_pre_hooks for m in teacher.model.modules())


def test_item_order_spread_and_class_major():
    spread = item_order(3, 2, "spread")
    assert spread.tolist() == [[0, 0], [1, 0], [2, 0], [0, 1], [1, 1], [2, 1]]
    major = item_order(3, 2, "class-major")
    assert major.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]]
    tenths = item_order(3, 20, "class-tenths")  # G-VBSM's Tiny-ImageNet order: 2 slots of each class at a time
    assert tenths[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1], [0, 2], [0, 3]]
    assert torch.equal(tenths[tenths[:, 0].argsort(stable=True)], item_order(3, 20, "class-major"))
    with pytest.raises(DDKitError, match="batch_mode"):
        item_order(3, 2, "random")


def test_patch_cells_fit_and_strict():
    assert patch_cells_for(torch.Size([2, 3, 8, 8]), 4, "fit") == 4
    assert patch_cells_for(torch.Size([2, 3, 6, 6]), 4, "fit") is None
    with pytest.raises(DDKitError, match="patch_cells=4 does not fit a 6x6"):
        patch_cells_for(torch.Size([2, 3, 6, 6]), 4, "strict")


def test_conv_targets_are_exact_pooled_statistics_and_cached(teacher, digits, monkeypatch):
    cfg = config("gvbsm", crop="none", flip=False, conv_target_images=0, conv_target_batch=0, patch_form="cells",
                 patch_cells=2)["recover"]
    targets = real_conv_targets(teacher, digits, cfg, CPU)
    x = normalize(digits.train.images.float() / 255, digits.mean, digits.std)
    with torch.no_grad(), capture_inputs(teacher.model, (nn.Conv2d,)) as taps:
        teacher.model(x)
    assert len(targets) == len(taps)
    for target, (_, inputs) in zip(targets, taps):
        mean, var = bn_statistics(inputs.double())
        assert torch.allclose(target.mean.double(), mean, atol=1e-5)
        assert torch.allclose(target.var.double(), var, atol=1e-4)
        assert (target.patch_mean is None) == (inputs.shape[-1] % 2 != 0)
    import ddkit.methods.recover as recover_module

    monkeypatch.setattr(recover_module, "capture_inputs", lambda *a: pytest.fail("recomputed cached targets"))
    cached = real_conv_targets(teacher, digits, cfg, CPU)
    assert all(torch.equal(a.var, b.var) for a, b in zip(cached, targets))


def test_conv_targets_average_the_statistics_of_batches_as_published(teacher, digits):
    cfg = config("gvbsm", crop="none", flip=False, conv_target_images=0, conv_target_batch=500)["recover"]
    targets = real_conv_targets(teacher, digits, cfg, CPU)
    x = normalize(digits.train.images.float() / 255, digits.mean, digits.std)
    batches = [x[start:start + 500] for start in range(0, x.shape[0], 500)]  # 500, 500, 442 images
    per_batch = []
    for batch in batches:
        with torch.no_grad(), capture_inputs(teacher.model, (nn.Conv2d,)) as taps:
            teacher.model(batch)
        per_batch.append([conv_statistics(inputs.double(), 4) for _, inputs in taps])
    weights = [b.shape[0] / x.shape[0] for b in batches]
    for layer, target in enumerate(targets):
        for field in ("mean", "var", "patch_mean", "patch_var"):  # the reference form: 4 x 4-px patches everywhere
            expected = sum(w * getattr(stats[layer], field) for w, stats in zip(weights, per_batch))
            assert torch.allclose(getattr(target, field).double(), expected, atol=1e-5)


def test_recover_lowers_both_losses_and_the_teacher_recognises_the_images(teacher, digits):
    cfg = config(iterations=60, lr=0.1, r_bn=0.1, crop="none", jitter=1)
    images, labels, record = RecoverEngine(digits, 2, cfg["recover"], [teacher], 0, CPU, False).run()
    assert images.shape == (20, 1, 8, 8) and labels.tolist() == torch.arange(10).repeat_interleave(2).tolist()
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    log = record["loss_log"]
    assert log[-1]["ce"] < 0.5 * log[0]["ce"] and log[-1]["bn"] < log[0]["bn"]
    with torch.no_grad():
        predicted = teacher.model(normalize(images, digits.mean, digits.std)).argmax(1)
    assert float((predicted == labels).float().mean()) >= 0.8


def test_recover_is_seeded(teacher, digits):
    cfg = config("cda", iterations=5)["recover"]
    a = RecoverEngine(digits, 1, cfg, [teacher], 3, CPU, False).run()[0]
    b = RecoverEngine(digits, 1, cfg, [teacher], 3, CPU, False).run()[0]
    assert torch.equal(a, b)


def test_cda_curriculum_reaches_the_floor(teacher, digits):
    cfg = config("cda", iterations=10, log_every=1)["recover"]
    log = RecoverEngine(digits, 1, cfg, [teacher], 0, CPU, False).run()[2]["loss_log"]
    assert log[0]["crop_min"] == pytest.approx(1.0) and log[-1]["crop_min"] < 0.2
    assert all(a["crop_min"] >= b["crop_min"] for a, b in zip(log, log[1:]))


def test_gvbsm_uses_every_term_round_robin(teacher, digits):
    cfg = config("gvbsm", iterations=4, log_every=1, conv_drop=0.0, densify_form="unit")["recover"]
    log = RecoverEngine(digits, 2, cfg, [teacher, teacher], 0, CPU, False).run()[2]["loss_log"]
    assert all(row["conv"] > 0 and row["bn"] > 0 and row["dense"] > 0 for row in log)
    # the published densification at image scale: eigenvalues far apart, softmaxes one-hot, the term ~ 0
    cfg = config("gvbsm", iterations=2, log_every=1)["recover"]
    log = RecoverEngine(digits, 2, cfg, [teacher], 0, CPU, False).run()[2]["loss_log"]
    assert all(row["dense"] < 1e-6 for row in log)


def test_the_x10_weight_goes_to_the_first_hooked_module_the_stem_conv(teacher, digits):
    model = teacher.model
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    gvbsm = StatisticsHooks(model, config("gvbsm")["recover"], [None] * len(convs))
    assert gvbsm.modules[0] is convs[0] and gvbsm.weights[0] == 10.0
    assert gvbsm.weights[gvbsm.modules.index(bns[0])] == 1.0  # the first BatchNorm counts once
    sre2l = StatisticsHooks(model, config("sre2l")["recover"])
    assert sre2l.modules == bns and sre2l.weights == [10.0] + [1.0] * (len(bns) - 1)


def test_the_ema_lives_for_the_whole_run_and_a_dropped_conv_keeps_its_own(teacher, digits):
    cfg = config("gvbsm", iterations=2, batch_size=10, conv_drop=0.5)["recover"]
    engine = RecoverEngine(digits, 2, cfg, [teacher], 0, CPU, False)
    seen = []
    original = engine._statistics_losses

    def spy(t_index, taps):
        before = {key: value.clone() for key, value in engine.ema.items()}
        result = original(t_index, taps)
        seen.append((before, {key: value.clone() for key, value in engine.ema.items()}))
        return result

    engine._statistics_losses = spy
    engine.run()
    assert len(seen) == 4  # two batches of 10 images, two iterations each
    carried = seen[2][0]  # the second batch starts from the EMA the first one left
    assert carried and all(torch.equal(carried[key], seen[1][1][key]) for key in carried)
    convs = {index for index, module in enumerate(engine.hooks[0].modules) if isinstance(module, nn.Conv2d)}
    unchanged = [key for before, after in seen[1:] for key in before
                 if key[1] in convs and torch.equal(before[key], after[key])]
    assert unchanged  # some conv hook was dropped in some forward and left its EMA as it was
    bn_keys = [key for key in seen[-1][0] if key[1] not in convs]
    assert all(not torch.equal(seen[-1][0][key], seen[-1][1][key]) for key in bn_keys)  # BN hooks always count


def test_bad_recover_options(teacher, digits):
    with pytest.raises(DDKitError, match="curriculum"):
        RecoverEngine(digits, 1, config(curriculum="exp")["recover"], [teacher], 0, CPU, False)
    for options, message in (({"iterations": "abc"}, "iterations='abc' is not valid; give an integer >= 1"),
                             ({"lr": 0}, "lr=0 is not valid; give a number > 0"),
                             ({"milestone": 1.5}, "milestone=1.5 is not valid"),
                             ({"crop": "maybe"}, "crop='maybe' is not valid; choose one of: resized, padded, none"),
                             ({"crop": "padded", "curriculum": "cosine"}, "set crop=resized or curriculum=none"),
                             ({"ema_alpha": 2}, "ema_alpha=2 is not valid"),
                             ({"densify_form": "cosine"}, "densify_form='cosine' is not valid")):
        with pytest.raises(DDKitError, match=message):
            RecoverEngine(digits, 1, config(**options)["recover"], [teacher], 0, CPU, False)
    with pytest.raises(DDKitError, match="larger than the 8px"):
        RecoverEngine(digits, 1, config("gvbsm", patch_form="cells", patch_cells=9)["recover"], [teacher], 0, CPU,
                      False)
    no_bn = squeeze(digits, {"arch": "convnet", "width": 8, "norm": "instance", "depth": None}, preset="smoke",
                    overrides={"epochs": 1}, show_progress=False)
    with pytest.raises(DDKitError, match="no teacher has a BatchNorm2d"):
        RecoverEngine(digits, 1, config()["recover"], [no_bn], 0, CPU, False)


def test_bad_squeeze_and_relabel_options_fail_before_any_training(teacher, digits):
    from ddkit.evaluate import random_subset

    model = {"arch": "convnet", "width": 8, "norm": "batch", "depth": None}
    for options, message in (({"epochs": "abc"}, "squeeze option epochs='abc' is not valid"),
                             ({"batch_size": 0}, "squeeze option batch_size=0 is not valid"),
                             ({"train_subset": -1}, "squeeze option train_subset=-1 is not valid")):
        with pytest.raises(DDKitError, match=message):
            squeeze(digits, model, preset="smoke", overrides=options, show_progress=False)
    subset = random_subset(digits, 1, seed=0)
    for options, message in (({"epochs": "x"}, "relabel option epochs='x' is not valid"),
                             ({"crop_scale_min": 2}, "relabel option crop_scale_min=2 is not valid"),
                             ({"equalize_norm": 1}, "relabel option equalize_norm=1 is not valid")):
        cfg = stats_family.resolve_preset("sre2l", "digits", 10, "smoke")
        cfg["relabel"].update(options)
        with pytest.raises(DDKitError, match=message):
            stats_family.relabel_with(subset, [teacher], cfg, 0, CPU, False)
    assert not subset.has_soft_labels


def test_preset_overrides_bare_and_qualified():
    cfg = stats_family.resolve_preset("gvbsm", "digits", 10, "quick", ["lr=0.2", "relabel.epochs=7"])
    assert cfg["recover"]["lr"] == 0.2 and cfg["relabel"]["epochs"] == 7
    assert cfg["recover"]["ema_alpha"] == 0.8 and cfg["relabel"]["eval_loss"] == "mse_ce"
    assert len(cfg["teachers"]) == 4
    with pytest.raises(DDKitError, match="unknown gvbsm option"):
        stats_family.resolve_preset("gvbsm", "digits", 10, "quick", ["nope=1"])


def test_paper_presets_are_the_published_recipes_of_each_dataset():
    sre2l = stats_family.resolve_preset("sre2l", "cifar100", 10, "paper")
    assert sre2l["reference"] == "cifar100" and sre2l["teachers"] == [{"arch": "resnet18_bn"}]
    assert (sre2l["recover"]["iterations"], sre2l["recover"]["lr"], sre2l["recover"]["r_bn"]) == (1000, 0.25, 0.01)
    assert (sre2l["recover"]["crop"], sre2l["recover"]["flip"], sre2l["recover"]["jitter_mode"]) == ("none", False,
                                                                                                      "positive")
    assert (sre2l["squeeze"]["epochs"], sre2l["squeeze"]["lr"], sre2l["squeeze"]["schedule"]) == (200, 0.1,
                                                                                                   "cosine_epoch")
    assert sre2l["relabel"]["mix"] == "mixup" and sre2l["relabel"]["eval_recipe"] == "sre2l-cifar100"
    tiny = stats_family.resolve_preset("sre2l", "tiny-imagenet", 10, "paper")
    assert tiny["recover"]["jitter_mode"] == "symmetric" and tiny["squeeze"]["warmup_epochs"] == 5
    assert tiny["relabel"]["epochs"] == 100 and tiny["relabel"]["mix"] == "none"
    cda = stats_family.resolve_preset("cda", "cifar10", 10, "paper")
    assert cda["reference"] == "tiny" and cda["recover"]["curriculum"] == "cosine" and cda["recover"]["lr"] == 0.4
    for dataset, epochs, relabel in (("cifar10", 5, 1000), ("cifar100", 50, 1000), ("tiny-imagenet", 50, 100)):
        gvbsm = stats_family.resolve_preset("gvbsm", dataset, 10, "paper")
        assert len(gvbsm["teachers"]) == 5 and gvbsm["squeeze"]["epochs"] == epochs
        assert gvbsm["relabel"]["epochs"] == relabel
        assert (gvbsm["recover"]["crop"], gvbsm["recover"]["patch_form"], gvbsm["recover"]["densify_form"]) == (
            "padded", "reference", "reference")
    assert stats_family.resolve_preset("gvbsm", "tiny-imagenet", 10, "paper")["squeeze"]["lr"] == 0.1
    # sets without a published recipe take the closest one
    assert stats_family.reference_for("gvbsm", "fashion-mnist")[0] == "cifar10"
    assert stats_family.reference_for("sre2l", "fashion-mnist")[0] == "cifar100"


def test_quick_tier_is_the_same_algorithm_made_smaller():
    for method in stats_family.METHODS:
        quick = stats_family.resolve_preset(method, "fashion-mnist", 10, "quick")
        paper = stats_family.resolve_preset(method, "fashion-mnist", 10, "paper")
        shrunk = {("recover", "iterations"), ("recover", "conv_target_images"), ("relabel", "epochs"),
                  ("squeeze", "epochs"), ("squeeze", "train_subset"), ("squeeze", "warmup_epochs")}
        for stage in ("recover", "relabel", "squeeze"):
            for key, value in paper[stage].items():
                if (stage, key) not in shrunk:
                    assert quick[stage][key] == value, (method, stage, key)
        assert quick["recover"]["iterations"] <= 500 and quick["squeeze"]["epochs"] == 2
    # an override still wins
    assert stats_family.resolve_preset("gvbsm", "fashion-mnist", 10, "quick", ["jitter=4"])["recover"]["jitter"] == 4


def test_teacher_cache_keys_change_with_the_recipe():
    quick = stats_family.resolve_preset("gvbsm", "fashion-mnist", 10, "quick")
    keys = stats_family.teacher_keys(quick, "fashion-mnist")
    assert len(set(keys)) == len(keys) == 4
    other = stats_family.resolve_preset("gvbsm", "fashion-mnist", 10, "quick", ["squeeze.lr=0.1"])
    assert not set(keys) & set(stats_family.teacher_keys(other, "fashion-mnist"))
    padded = stats_family.resolve_preset("gvbsm", "fashion-mnist", 10, "quick", ["squeeze.crop=none"])
    assert not set(keys) & set(stats_family.teacher_keys(padded, "fashion-mnist"))


def test_a_published_teacher_recipe_trains_with_its_augmentation_and_schedule(digits, tmp_path, monkeypatch):
    import ddkit.augment.crops as crops_module
    import ddkit.methods.squeeze as squeeze_module
    import ddkit.optim as optim_module

    monkeypatch.setenv("DDKIT_DATA", str(tmp_path))
    crops, rates = [], []
    set_lr, augment_batch = optim_module.set_lr, crops_module.augment_batch

    def record_lr(optimizer, lr):
        rates.append(lr)
        set_lr(optimizer, lr)

    def record_crop(x, generator, crop, flip_prob, per_sample, *args):
        crops.append((crop, flip_prob, per_sample))
        return augment_batch(x, generator, crop, flip_prob, per_sample, *args)

    monkeypatch.setattr(optim_module, "set_lr", record_lr)
    monkeypatch.setattr(squeeze_module, "augment_batch", record_crop)  # the name train_teacher calls
    monkeypatch.setattr(squeeze_module, "train_classifier", lambda *a, **k: pytest.fail("the generic loop trained"))
    recipe = stats_family.resolve_preset("sre2l", "tiny-imagenet", 10, "smoke")["squeeze"]
    recipe.update(epochs=4, warmup_epochs=2, train_subset=300, batch_size=100)
    teacher = squeeze_module.train_cached(digits, TEACHER, recipe, seed=0, device=CPU)
    assert teacher.recipe["crop"] == "resized" and teacher.recipe["warmup_epochs"] == 2
    # 3 batches per epoch: warm-up from 0.01 of lr 0.2 over 2 epochs, then a cosine over the other 2
    assert rates[::3] == pytest.approx([0.002, 0.101, 0.2, 0.1]) and len(rates) == 12
    assert crops == [("resized", 0.0, True)] * 12  # per image, no flip on digits


def test_cli_cell_size_that_does_not_fit_exits_2(isolated_data, capsys):
    code = main(["recover", "gvbsm", "--dataset", "digits", "--ipc", "1", "--preset", "smoke", "--out",
                 str(isolated_data / "x"), "--set", "patch_form=cells", "--set", "patch_cells=3", "--set",
                 "patch_policy=strict", "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("ddkit: error: patch_cells=3 does not fit") and "Traceback" not in err


def test_cli_sre2l_end_to_end_then_soft_eval_and_a_set_without_soft_labels(isolated_data, capsys):
    out = isolated_data / "sre2l"
    assert main(["distill", "sre2l", "--dataset", "digits", "--ipc", "2", "--preset", "smoke", "--out", str(out),
                 "-q", "--set", "relabel.epochs=3"]) == 0
    distilled = ddkit.load(out)
    assert distilled.has_soft_labels and distilled.extras["relabel.logits"].shape == (3, 20, 10)
    assert distilled.meta["teachers"][0]["test_accuracy"] > 50
    assert main(["eval", str(out), "--protocol", "soft", "--preset", "smoke", "--runs", "1", "-q",
                 "--set", "epochs=3"]) == 0
    assert ddkit.load(out).meta["evaluations"][-1]["protocol"] == "soft"
    random_set = isolated_data / "random"
    assert main(["baseline", "random", "--dataset", "digits", "--ipc", "2", "--out", str(random_set)]) == 0
    capsys.readouterr()
    assert main(["eval", str(random_set), "--protocol", "soft", "--preset", "smoke", "--runs", "1", "-q"]) == 2
    assert "no relabel records" in capsys.readouterr().err
    assert main(["relabel", str(random_set), "--like", "sre2l", "--preset", "smoke", "-q",
                 "--set", "relabel.epochs=2"]) == 0
    assert ddkit.load(random_set).extras["relabel.logits"].shape == (2, 20, 10)


def test_cli_plan_shows_the_published_configuration_without_any_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDKIT_DATA", str(tmp_path / "empty"))  # no dataset and no teacher is there
    assert main(["distill", "gvbsm", "--preset", "paper", "--plan"]) == 0
    out = capsys.readouterr().out
    for dataset, padding, recipe in (("cifar10", 4, "gvbsm-cifar10"), ("cifar100", 4, "gvbsm-cifar100"),
                                     ("tiny-imagenet", 8, "gvbsm-tiny")):
        block = out.split(f"gvbsm on {dataset} ")[1].split("\n\n")[0]
        assert f"recover: 4000 iterations, Adam lr 0.05" in block
        assert f"RandomCrop padded {padding} px + flip, one per batch, then a cyclic roll of 0..32 px" in block
        assert "4x4-pixel patches pooled over batch and channels" in block and "EMA 0.8 over the whole run" in block
        assert "x10 on the first, conv1 (Conv2d)" in block and "tempered target detached, summed over classes" in block
        assert f"recipe {recipe} (" in block and "teachers (5," in block
    assert "MSE + 0.1 CE (base label), student resnet18" in out.split("gvbsm on tiny-imagenet")[1]
    assert not (tmp_path / "empty").exists()  # nothing was fetched, trained or cached
    assert main(["distill", "sre2l", "--dataset", "fashion-mnist", "--preset", "quick", "--plan",
                 "--set", "jitter=2"]) == 0
    out = capsys.readouterr().out
    assert "reference cifar100" in out and "no crop + no flip, one per batch, then a cyclic roll of 0..2 px" in out
    assert main(["distill", "dm", "--dataset", "mnist", "--plan"]) == 2
    assert main(["eval", "--recipe", "list"]) == 0
    listed = capsys.readouterr().out
    assert "sre2l-cifar100" in listed and "KL T 30" in listed and "gvbsm-cifar100" in listed


def test_a_run_long_ema_resumes_from_its_checkpoints_exactly(teacher, digits, tmp_path, monkeypatch):
    """G-VBSM's EMA carries over from batch to batch: a stopped run takes it from the last finished
    batch and the batch in progress, and ends with the images of a run never stopped."""
    import ddkit.methods.recover as recover_module

    cfg = config("gvbsm", iterations=6, batch_size=10, conv_target_images=100)["recover"]
    whole = RecoverEngine(digits, 3, cfg, [teacher], 0, CPU, False).run()[0]  # 3 batches
    steps = []

    def stop_in_the_third_batch(step):
        steps.append(step)
        if len(steps) == 15:
            raise KeyboardInterrupt

    monkeypatch.setattr(recover_module.distributed, "maybe_inject_fault", stop_in_the_third_batch)
    checkpoint = {"dir": str(tmp_path / "ckpt"), "every": 2, "seconds": 0, "resume": False, "run": {}}
    with pytest.raises(KeyboardInterrupt):
        RecoverEngine(digits, 3, cfg, [teacher], 0, CPU, False).run(checkpoint)
    monkeypatch.setattr(recover_module.distributed, "maybe_inject_fault", lambda step: None)
    resumed = RecoverEngine(digits, 3, cfg, [teacher], 0, CPU, False).run({**checkpoint, "resume": True})[0]
    assert torch.equal(resumed, whole)
    fresh = RecoverEngine(digits, 3, {**cfg, "ema_scope": "batch"}, [teacher], 0, CPU, False).run()[0]
    assert not torch.equal(fresh[20:], whole[20:]) and torch.equal(fresh[:10], whole[:10])
