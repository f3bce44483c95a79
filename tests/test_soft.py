"""Relabel records (FKD-style soft labels) and the soft-label evaluation protocol."""

import json
import math

import pytest
import torch

import ddkit
from ddkit.augment.crops import CropParams, apply_crops
from ddkit.augment.replay import ReplayPlan, replay_inputs, sample_replay_plan
from ddkit.errors import DDKitError
from ddkit.evaluate import evaluate, random_subset, resolve_config, soft_loss
from ddkit.evaluate.protocols import evaluation_config
from ddkit.evaluate.soft import SOFT_RECIPES, ReplaySource, SoftProtocol, recipe_for_set, train_soft
from ddkit.methods.relabel import auto_flip_prob, ensemble_logits, relabel
from ddkit.models import create
from ddkit.models.training import train_classifier
from ddkit.utils import make_generator, normalize, seeded_global_rng


def _teacher(num_classes=10, width=8, seed=0):
    with seeded_global_rng(seed):
        return create("convnet", in_channels=1, num_classes=num_classes, image_size=8, width=width, norm="batch")


@pytest.fixture(scope="module")
def trained_teacher(digits):
    """A small ConvNet trained briefly on the digits training split (about 85-90 % test)."""
    teacher = _teacher(width=16)
    images = normalize(digits.train.images.float() / 255.0, digits.mean, digits.std)
    config = {"epochs": 2, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64, "decay_at": None}
    train_classifier(teacher, images, digits.train.labels, config, make_generator(0))
    return teacher.eval()


class _Fixed(torch.nn.Module):
    """A 'teacher' returning fixed logits whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits, dtype=torch.float32)

    def forward(self, x):
        return self.logits


# ---- replay plans ------------------------------------------------------------------------------
@pytest.mark.parametrize("mix", ["cutmix", "mixup", "none"])
def test_replay_is_independent_of_batch_size_and_order(mix):
    images = torch.randn(13, 3, 10, 12)
    plan = sample_replay_plan(13, 3, (10, 12), make_generator(5), scale=(0.2, 1.0), flip_prob=0.5, mix=mix)
    for epoch in range(3):
        full, partner, lam = replay_inputs(images, plan, epoch, torch.arange(13))
        order = torch.randperm(13, generator=make_generator(epoch))
        for batch_size in (3, 7):
            parts = [replay_inputs(images, plan, epoch, order[s:s + batch_size]) for s in range(0, 13, batch_size)]
            assert torch.equal(torch.cat([p[0] for p in parts]), full[order])
            assert torch.equal(torch.cat([p[1] for p in parts]), partner[order])
            assert torch.equal(torch.cat([p[2] for p in parts]), lam[order])
        # per-sample epochs (as relabel chunks E * N views) give the same rows
        mixed = replay_inputs(images, plan, torch.tensor([epoch, 0, epoch]), torch.tensor([4, 4, 9]))[0]
        assert torch.equal(mixed[0], full[4]) and torch.equal(mixed[2], full[9])
        assert torch.equal(mixed[1], replay_inputs(images, plan, 0, torch.tensor([4]))[0][0])


def test_cutmix_mixup_and_partners_follow_the_records():
    images = torch.randn(9, 1, 8, 8)
    plan = sample_replay_plan(9, 4, 8, make_generator(0), scale=(0.3, 1.0), flip_prob=0.5, mix="cutmix")
    assert plan.crop.dtype == torch.int16 and plan.flip.dtype == torch.uint8 and plan.partner.dtype == torch.int32
    assert plan.mix_box.dtype == torch.int16 and plan.mix_box.shape == (4, 9, 4)
    for epoch in range(4):
        assert sorted(plan.partner[epoch].tolist()) == list(range(9))  # a permutation per epoch
    epoch, index = 2, torch.arange(9)
    inputs, partner, lam = replay_inputs(images, plan, epoch, index)
    assert torch.equal(partner, plan.partner[epoch].long())
    box = plan.mix_box[epoch].long()
    assert torch.allclose(lam, 1.0 - (box[:, 2] * box[:, 3]).float() / 64.0)

    def views(idx):
        b = plan.crop[epoch, idx].long()
        return apply_crops(images[idx], CropParams(b[:, 0], b[:, 1], b[:, 2], b[:, 3],
                                                   plan.flip[epoch, idx].bool(), (8, 8)), 8)

    a, b = views(index), views(partner)  # the partner uses its OWN crop and flip
    for i in range(9):
        top, left, h, w = box[i].tolist()
        mask = torch.zeros(8, 8, dtype=torch.bool)
        mask[top:top + h, left:left + w] = True
        assert torch.equal(inputs[i][:, mask], b[i][:, mask]) and torch.equal(inputs[i][:, ~mask], a[i][:, ~mask])

    mixup = sample_replay_plan(9, 2, 8, make_generator(1), mix="mixup", beta=0.5)
    out, partner, lam = replay_inputs(images, mixup, 1, index)
    assert torch.equal(lam, mixup.mix_lam[1]) and ((lam >= 0) & (lam <= 1)).all()
    plain = ReplayPlan(mixup.crop, mixup.flip, torch.arange(9).repeat(2, 1).int(), "none")
    a = replay_inputs(images, plain, 1, index)[0]
    b = replay_inputs(images, plain, 1, partner)[0]
    assert torch.allclose(out, lam.view(-1, 1, 1, 1) * a + (1 - lam.view(-1, 1, 1, 1)) * b, atol=1e-6)

    none = sample_replay_plan(9, 2, 8, make_generator(1), mix="none")
    _, partner, lam = replay_inputs(images, none, 0, index)
    assert torch.equal(partner, index) and torch.equal(lam, torch.ones(9))

    # the records round-trip through extras, and a plan of E epochs is a prefix of a longer one
    again = ReplayPlan.from_extras(plan.to_extras())
    assert again.mix == "cutmix" and torch.equal(again.mix_box, plan.mix_box) and torch.equal(again.crop, plan.crop)
    longer = sample_replay_plan(9, 6, 8, make_generator(0), scale=(0.3, 1.0), flip_prob=0.5, mix="cutmix")
    assert torch.equal(longer.crop[:4], plan.crop) and torch.equal(longer.mix_box[:4], plan.mix_box)


def test_flips_follow_the_dataset(tiny_set):
    assert auto_flip_prob("digits", None) == 0.0 and auto_flip_prob("mnist", None) == 0.0
    assert auto_flip_prob("cifar10", None) == 0.5 and auto_flip_prob("mnist", 0.3) == 0.3
    teacher = _teacher(num_classes=3)
    out = relabel(tiny_set, teacher, epochs=20, show_progress=False)  # tiny_set.dataset == "digits"
    assert int(out.extras["relabel.flip"].sum()) == 0 and out.meta["relabel"]["flip_prob"] == 0.0
    tiny_set.dataset = "cifar10"
    out = relabel(tiny_set, teacher, epochs=20, show_progress=False)
    assert 0 < int(out.extras["relabel.flip"].sum()) < 120


# ---- teacher ensembles -------------------------------------------------------------------------
def test_ensemble_norm_equalisation_by_hand():
    t1, t2 = [[3.0, 4.0], [0.0, 1.0]], [[6.0, 8.0], [0.0, 3.0]]
    teachers = [_Fixed(t1), _Fixed(t2)]
    x = torch.zeros(2, 1, 8, 8)
    assert torch.allclose(ensemble_logits(teachers, x), torch.tensor([[4.5, 6.0], [0.0, 2.0]]))
    # per-sample rows: norms 5 and 10 -> 7.5; 1 and 3 -> 2
    expected = torch.tensor([[4.5, 6.0], [0.0, 2.0]])
    assert torch.allclose(ensemble_logits(teachers, x, equalize_norm=True), expected)
    # whole-batch Frobenius norms sqrt(26) and sqrt(109)
    n1, n2 = math.sqrt(26.0), math.sqrt(109.0)
    common = (n1 + n2) / 2
    by_batch = (torch.tensor(t1) * common / n1 + torch.tensor(t2) * common / n2) / 2
    assert torch.allclose(ensemble_logits(teachers, x, equalize_norm=True, norm_scope="batch"), by_batch)


# ---- losses ------------------------------------------------------------------------------------
def _softmax(v):
    e = [math.exp(a - max(v)) for a in v]
    return [a / sum(e) for a in e]


def test_kl_and_mse_ce_losses_by_hand():
    s = [[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]]
    t = [[0.0, 1.0, 3.0], [2.0, 0.0, 1.0]]
    temp = 2.0

    def kl_row(si, ti):
        p = _softmax([v / temp for v in ti])
        q = _softmax([v / temp for v in si])
        return sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q))

    kl = (kl_row(s[0], t[0]) + kl_row(s[1], t[1])) / 2
    student, teacher = torch.tensor(s), torch.tensor(t)
    assert soft_loss(student, teacher, loss="kl", temperature=temp).item() == pytest.approx(kl, rel=1e-5)
    assert soft_loss(student, teacher, loss="kl", temperature=temp, t2=True).item() == pytest.approx(4 * kl, rel=1e-5)

    labels, partners, lam = torch.tensor([2, 0]), torch.tensor([1, 0]), torch.tensor([0.75, 0.4])
    mse = sum((a - b) ** 2 for r1, r2 in zip(s, t) for a, b in zip(r1, r2)) / 6
    ce = lambda row, y: -math.log(_softmax(row)[y])  # noqa: E731
    base = (ce(s[0], 2) + ce(s[1], 0)) / 2  # G-VBSM: the base image's label, whatever was pasted in
    got = soft_loss(student, teacher, loss="mse_ce", gamma=0.15, labels=labels, partner_labels=partners, lam=lam)
    assert got.item() == pytest.approx(mse + 0.15 * base, rel=1e-5)
    mixed = (0.75 * ce(s[0], 2) + 0.25 * ce(s[0], 1) + 0.4 * ce(s[1], 0) + 0.6 * ce(s[1], 0)) / 2
    got = soft_loss(student, teacher, loss="mse_ce", gamma=0.15, labels=labels, partner_labels=partners, lam=lam,
                    ce_label="mixed")
    assert got.item() == pytest.approx(mse + 0.15 * mixed, rel=1e-5)

    # top-k: the teacher distribution is the softmax over the kept logits only; MSE on kept entries
    values, indices = torch.tensor([[3.0, 1.0], [2.0, 1.0]]), torch.tensor([[2, 1], [0, 2]])
    top = 0.0
    for row, (v, idx) in enumerate(zip(values.tolist(), indices.tolist())):
        p = _softmax([a / temp for a in v])
        q = _softmax([a / temp for a in s[row]])
        top += sum(pk * (math.log(pk) - math.log(q[k])) for pk, k in zip(p, idx)) / 2
    assert soft_loss(student, values, indices, loss="kl", temperature=temp).item() == pytest.approx(top, rel=1e-5)
    kept_mse = ((3.0 - 0.0) ** 2 + (1.0 - 2.0) ** 2 + (2.0 - 0.5) ** 2 + (1.0 - 2.0) ** 2) / 4  # s[i, kept] vs v
    got = soft_loss(student, values, indices, loss="mse_ce", gamma=0.0, labels=labels)
    assert got.item() == pytest.approx(kept_mse, rel=1e-5)
    with pytest.raises(DDKitError, match="unknown soft loss"):
        soft_loss(student, teacher, loss="l1")


# ---- relabel -----------------------------------------------------------------------------------
def test_relabel_records_round_trip_and_match_the_teacher(digits, tmp_path):
    subset = random_subset(digits, 2, seed=0)
    teacher = _teacher()
    out = relabel(subset, [teacher, _teacher(seed=1)], epochs=3, crop_scale=(0.3, 1.0), batch_size=7,
                  teacher_info=["convnet-a", "convnet-b"], eval_loss="mse_ce", show_progress=False)
    assert out.extras["relabel.logits"].shape == (3, 20, 10) and out.extras["relabel.logits"].dtype == torch.float16
    assert out.extras["relabel.crop"].shape == (3, 20, 4) and "relabel.mix_box" in out.extras
    assert out.stored_bytes()["soft_labels"] > 0 and out.has_soft_labels and not subset.extras
    settings = json.loads(json.dumps(out.meta["relabel"]))
    assert settings["epochs"] == 3 and settings["teacher_info"] == ["convnet-a", "convnet-b"]
    assert settings["mix"] == "cutmix" and settings["eval_loss"] == "mse_ce"
    # the stored logits are the ensemble's on exactly the replayed input
    images = normalize(subset.images, subset.mean, subset.std)
    plan = ReplayPlan.from_extras(out.extras)
    inputs = replay_inputs(images, plan, 1, torch.arange(20))[0]
    with torch.no_grad():
        expected = ensemble_logits([teacher.eval(), _teacher(seed=1).eval()], inputs).half()
    assert torch.allclose(out.extras["relabel.logits"][1].float(), expected.float(), atol=2e-3)

    out.save(tmp_path / "r")
    back = ddkit.load(tmp_path / "r")
    assert set(back.extras) == set(out.extras)
    for name, tensor in out.extras.items():
        assert back.extras[name].dtype == tensor.dtype and torch.equal(back.extras[name], tensor)
    assert back.meta["relabel"] == settings

    top = relabel(subset, teacher, epochs=2, topk=3, mix="mixup", show_progress=False)
    assert top.extras["relabel.topk_values"].shape == (2, 20, 3) and "relabel.logits" not in top.extras
    assert top.extras["relabel.topk_indices"].dtype == torch.int16 and "relabel.mix_lam" in top.extras
    assert top.stored_bytes()["soft_labels"] < out.stored_bytes()["soft_labels"]


def test_relabel_and_soft_errors(digits, tiny_set):
    subset = random_subset(digits, 2, seed=0)
    with pytest.raises(DDKitError, match="no relabel records"):
        evaluate(subset, protocol="soft", preset="smoke", real=digits, show_progress=False)
    with pytest.raises(DDKitError, match="7 logits but the set has 10 classes"):
        relabel(subset, _teacher(num_classes=7), epochs=1, show_progress=False)
    with pytest.raises(DDKitError, match="stored images"):
        partitioned = ddkit.DistilledSet(images=torch.rand(2, 1, 8, 8), labels=torch.tensor([0, 1]),
                                         class_names=["a", "b"], dataset="digits", mean=(0.5,), std=(0.5,),
                                         decode={"kind": "partition", "factor": 2})
        relabel(partitioned, _teacher(num_classes=2), epochs=1, show_progress=False)
    relabelled = relabel(subset, _teacher(), epochs=1, show_progress=False)
    with pytest.raises(DDKitError, match="loss=.l1. is not valid"):
        evaluate(relabelled, protocol="soft", preset="smoke", overrides={"loss": "l1"}, real=digits)
    with pytest.raises(DDKitError, match="unknown evaluation preset"):
        evaluate(relabelled, protocol="soft", preset="huge", real=digits)
    with pytest.raises(DDKitError, match="only used by protocol 'soft'"):
        evaluate(subset, protocol="hard", preset="smoke", teachers=[_teacher()], real=digits)
    with pytest.raises(DDKitError, match="mix"):
        relabel(subset, _teacher(), epochs=1, mix="mosaic", show_progress=False)


def test_soft_presets():
    paper = resolve_config("soft", "paper")
    assert (paper["epochs"], paper["optimizer"], paper["lr"], paper["weight_decay"], paper["batch_size"]) == (
        1000, "adamw", 1e-3, 0.01, 64)
    assert (paper["temperature"], paper["t2"], paper["gamma"], paper["loss"]) == (20.0, False, 0.15, "auto")
    assert paper["recipe"] == "ddkit" and paper["schedule"] == "cosine" and not paper["exempt_1d"]
    assert resolve_config("soft", "quick")["epochs"] == 300
    smoke = resolve_config("soft", "smoke")
    assert smoke["epochs"] == 20 and smoke["model"] == {"width": 32, "norm": "batch"} and smoke["batch_size"] == 16
    assert resolve_config("soft", "quick")["batch_size"] == 64 and resolve_config("soft", "quick")["model"] == {}
    tiny = resolve_config("soft", "paper", ["optimizer=sgd", "lr=0.2", "weight_decay=1e-4", "t2=true"])
    assert (tiny["optimizer"], tiny["lr"], tiny["t2"]) == ("sgd", 0.2, True)


def test_evaluation_recipes_are_the_published_ones_and_tiers_shrink_their_epochs():
    recipe = resolve_config("soft", "paper", recipe="gvbsm-cifar100")
    assert (recipe["optimizer"], recipe["lr"], recipe["weight_decay"], recipe["exempt_1d"], recipe["batch_size"],
            recipe["epochs"], recipe["loss"], recipe["gamma"], recipe["arch"]) == (
        "sgd", 0.1, 5e-4, True, 64, 1000, "mse_ce", 0.15, "convnet")
    assert resolve_config("soft", "quick", recipe="gvbsm-cifar100")["epochs"] == 300
    tiny = resolve_config("soft", "quick", recipe="sre2l-tiny")
    assert (tiny["epochs"], tiny["t2"], tiny["warmup_epochs"], tiny["arch"]) == (100, True, 5, "resnet18")
    cifar = resolve_config("soft", "paper", recipe="sre2l-cifar100")
    assert (cifar["temperature"], cifar["epochs"], cifar["batch_size"], cifar["schedule"]) == (30.0, 400, 128,
                                                                                               "cosine_epoch")
    assert resolve_config("soft", "paper", recipe="gvbsm-tiny")["gamma"] == 0.1
    assert resolve_config("soft", "smoke", recipe="gvbsm-cifar10")["model"] == {"width": 32, "norm": "batch"}
    assert resolve_config("soft", "smoke", recipe="sre2l-cifar100")["batch_size"] == 16  # smoke: 16 a step at most
    assert resolve_config("soft", "quick", recipe="sre2l-cifar100")["batch_size"] == 128  # quick: the recipe's
    assert set(SOFT_RECIPES) >= {"ddkit", "sre2l-imagenet", "sre2l-cifar100", "sre2l-tiny", "gvbsm-cifar100",
                                 "gvbsm-cifar10", "gvbsm-tiny"}  # CDA's code evaluates with SRe2L's
    with pytest.raises(DDKitError, match="unknown evaluation recipe 'nope'"):
        resolve_config("soft", "paper", recipe="nope")


def test_recipe_auto_is_the_one_the_relabel_step_named(digits):
    subset = random_subset(digits, 1, seed=0)
    named = relabel(subset, _teacher(), epochs=1, eval_recipe="gvbsm-cifar10", eval_loss="mse_ce",
                    show_progress=False)
    assert recipe_for_set(named) == "gvbsm-cifar10" and recipe_for_set(named, "ddkit") == "ddkit"
    assert recipe_for_set(relabel(subset, _teacher(), epochs=1, show_progress=False)) == "ddkit"
    config = evaluation_config(named, "soft", "smoke")
    assert config["recipe"] == "gvbsm-cifar10" and config["arch"] == "resnet18" and config["loss"] == "mse_ce"
    with pytest.raises(DDKitError, match="add --protocol soft"):
        evaluation_config(named, "hard", "smoke", recipe="gvbsm-tiny")


def test_learning_rate_schedules_and_weight_decay_groups():
    from ddkit.optim import lr_factor, parameter_groups

    warm = {"schedule": "cosine_epoch", "epochs": 10, "warmup_epochs": 5, "warmup_start": 0.01}
    # torchvision's LinearLR(0.01, 5) then CosineAnnealingLR(T_max=5), stepped per epoch
    assert [round(lr_factor(warm, e, 0, 1), 6) for e in (0, 1, 4, 5, 6, 9)] == [
        0.01, 0.208, 0.802, 1.0, round(0.5 * (1 + math.cos(math.pi / 5)), 6), round(0.5 * (1 + math.cos(4 * math.pi / 5)), 6)]
    assert lr_factor({"schedule": "cosine", "epochs": 2}, 1, 5, 10) == pytest.approx(0.5)  # per step
    assert lr_factor({"schedule": "constant", "epochs": 2}, 1, 5, 10) == 1.0
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(2, 3))
    decayed, exempt = parameter_groups(net, 5e-4, exempt_1d=True)
    assert [p.dim() for p in decayed["params"]] == [4, 2] and exempt["weight_decay"] == 0.0
    assert len(exempt["params"]) == 4  # conv bias, BN weight and bias, linear bias
    assert len(parameter_groups(net, 5e-4, exempt_1d=False)) == 1


def test_padded_crop_records_replay_torchvisions_randomcrop(digits):
    from ddkit.augment.crops import apply_padded_crops
    from ddkit.methods.relabel import padding_fill

    subset = random_subset(digits, 2, seed=0)
    out = relabel(subset, _teacher(), epochs=2, crop="padded", mix="mixup", mix_beta=0.8, show_progress=False)
    plan = ReplayPlan.from_extras(out.extras)
    assert plan.padding == 1 and out.meta["relabel"]["crop"] == "padded"  # 8 px digits: ceil(8 / 8)
    assert int(out.extras["relabel.crop"][..., :2].abs().max()) <= 1
    images = normalize(subset.images, subset.mean, subset.std)
    index = torch.arange(20)
    fill = padding_fill(subset)
    inputs, partner, lam = replay_inputs(images, plan, 1, index, fill)
    own = apply_padded_crops(images, plan.crop_params(torch.ones(20, dtype=torch.long), index, (8, 8)), fill)
    other = own[partner]
    weight = lam.view(-1, 1, 1, 1)
    assert torch.allclose(inputs, weight * own + (1 - weight) * other)
    assert torch.allclose(fill, (0 - torch.tensor(subset.mean)) / torch.tensor(subset.std))


# ---- online teachers ---------------------------------------------------------------------------
def test_online_teachers_see_the_same_inputs_and_targets(digits, monkeypatch):
    subset = random_subset(digits, 3, seed=1)
    teacher = _teacher(seed=3)
    records = relabel(subset, teacher, epochs=2, seed=4, crop_scale=(0.4, 1.0), show_progress=False)
    config = resolve_config("soft", "smoke", {"epochs": 2, "online.epochs": 2, "online.seed": 4,
                                              "online.crop_scale": [0.4, 1.0]})
    stored, _ = SoftProtocol(records, config).source("cpu")
    online, _ = SoftProtocol(subset, config, teachers=[teacher]).source("cpu")  # plan drawn from online.*
    online_rec, _ = SoftProtocol(records, config, teachers=[teacher]).source("cpu")  # plan from the records
    for epoch in range(2):
        for index in (torch.arange(30), torch.randperm(30, generator=make_generator(epoch))[:11]):
            a, b, c = stored.batch(epoch, index), online.batch(epoch, index), online_rec.batch(epoch, index)
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.inputs, c.inputs)
            assert torch.equal(a.partner, b.partner) and torch.equal(a.lam, b.lam)
            assert torch.allclose(a.values, b.values, atol=2e-3) and torch.allclose(a.values, c.values, atol=2e-3)

    # end to end: both modes train on identical batches (captured at the source)
    seen = {"records": [], "online": []}
    original = ReplaySource.batch

    def capture(self, epoch, index):
        batch = original(self, epoch, index)
        seen["online" if self.teachers is not None else "records"].append((epoch, index.clone(), batch.inputs))
        return batch

    monkeypatch.setattr(ReplaySource, "batch", capture)
    overrides = {"epochs": 3, "batch_size": 64, "online.epochs": 2, "online.seed": 4, "online.crop_scale": [0.4, 1.0]}
    rec = evaluate(records, protocol="soft", preset="smoke", runs=1, overrides=overrides, real=digits,
                   show_progress=False, record=False)["convnet"]
    onl = evaluate(subset, protocol="soft", preset="smoke", runs=1, overrides=overrides, real=digits,
                   show_progress=False, record=False, teachers=[teacher], teacher_info="convnet seed 3")["convnet"]
    assert rec.config["targets"] == "records" and onl.config["targets"] == "online"
    assert onl.config["online"]["plan"] == "sampled" and onl.config["teacher_info"] == "convnet seed 3"
    assert len(seen["records"]) == len(seen["online"]) == 3
    assert [e for e, _, _ in seen["records"]] == [0, 1, 0]  # 3 student epochs cycle 2 record epochs
    for (e1, i1, x1), (e2, i2, x2) in zip(seen["records"], seen["online"]):
        assert e1 == e2 and torch.equal(i1, i2) and torch.equal(x1, x2)


def test_without_augmentation_the_teachers_label_the_images_as_they_are(digits):
    subset = random_subset(digits, 3, seed=1)
    teacher = _teacher(seed=3).eval()
    records = relabel(subset, teacher, epochs=2, seed=4, show_progress=False)
    config = resolve_config("soft", "smoke", {"online.augment": False})
    for distilled in (subset, records):  # the records' augmented views are not replayed
        protocol = SoftProtocol(distilled, config, teachers=[teacher])
        assert protocol.config["online"]["plan"] == "plain"
        source, labels = protocol.source("cpu")
        assert source.epochs == 1 and torch.equal(labels, subset.labels)
        index = torch.tensor([4, 0, 29])
        batch = source.batch(0, index)
        images = normalize(subset.images, subset.mean, subset.std)[index]
        assert torch.allclose(batch.inputs, images, atol=1e-6)
        assert torch.equal(batch.partner, index)
        with torch.no_grad():
            assert torch.allclose(batch.values, teacher(images).half().float(), atol=1e-3)
    with pytest.raises(DDKitError, match=r"online.augment='no' is not valid; give true or false"):
        SoftProtocol(subset, resolve_config("soft", "smoke", {"online.augment": "no"}), teachers=[teacher])
    plan = ReplayPlan.identity(5, 8, 7)
    assert plan.crop.tolist()[0][3] == [0, 0, 8, 7] and plan.mix == "none" and plan.flip.sum() == 0


# ---- the protocol end to end -------------------------------------------------------------------
def test_soft_evaluation_of_a_relabelled_digits_subset_beats_chance(digits, trained_teacher, tmp_path):
    subset = random_subset(digits, 10, seed=0)
    relabelled = relabel(subset, trained_teacher, epochs=20, crop_scale=(0.5, 1.0), show_progress=False,
                         teacher_info=["convnet width 16, 2 epochs"])
    relabelled.save(tmp_path / "soft")
    # an instance-norm ConvNet learns very slowly on 8 px digits; a BatchNorm student is cheap here
    overrides = {"epochs": 60, "model": {"width": 32, "norm": "batch"}}
    result = evaluate(relabelled, protocol="soft", preset="smoke", runs=1, overrides=overrides, real=digits,
                      show_progress=False)["convnet"]
    assert result.protocol == "soft" and result.train_images == 100 and result.config["loss"] == "kl"
    assert result.mean > 40.0, result.mean  # chance is 10 %
    stored = ddkit.load(tmp_path / "soft")
    assert stored.meta["evaluations"][-1]["protocol"] == "soft"
    reused = evaluate(stored, protocol="soft", preset="smoke", runs=1, overrides=overrides, real=digits,
                      show_progress=False, reuse=True)["convnet"]
    assert reused.date == stored.meta["evaluations"][-1]["date"]
    assert reused.accuracies == pytest.approx(result.accuracies)


def test_a_stopped_soft_run_continues_from_its_epoch_checkpoint_bit_for_bit(digits, tmp_path):
    from ddkit.evaluate import build_model
    from ddkit.models.training import RunCheckpoint

    relabelled = relabel(random_subset(digits, 4, seed=0), _teacher(), epochs=3, show_progress=False)
    # 6 epochs of 40 images in batches of 16 (3 steps each): cosine lr by step, AdamW moments
    protocol = SoftProtocol(relabelled, dict(resolve_config("soft", "smoke"), epochs=6, batch_size=16))
    source, labels = protocol.source("cpu")
    options = {"width": 16, "norm": "batch"}

    whole = build_model("convnet", 1, 10, 8, options, 0, "cpu")
    whole_losses = train_soft(whole, source, labels, protocol.config, make_generator(0))

    path = tmp_path / "soft.safetensors"
    real_batch, calls = source.batch, []

    def stop_in_epoch_4(epoch, index):
        calls.append(1)
        if len(calls) == 11:
            raise KeyboardInterrupt
        return real_batch(epoch, index)

    source.batch = stop_in_epoch_4
    stopped = build_model("convnet", 1, 10, 8, options, 0, "cpu")
    with pytest.raises(KeyboardInterrupt):
        train_soft(stopped, source, labels, protocol.config, make_generator(0),
                   checkpoint=RunCheckpoint(path, {"run": "soft"}, every_seconds=0))
    source.batch = real_batch

    resumed = build_model("convnet", 1, 10, 8, options, 99, "cpu")
    losses = train_soft(resumed, source, labels, protocol.config, make_generator(5),
                        checkpoint=RunCheckpoint(path, {"run": "soft"}, every_seconds=0))
    assert losses == whole_losses
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert path.is_file()  # the last epoch's, kept for the caller to remove once the result is stored

    def no_batch(epoch, index):
        raise AssertionError("a finished run replayed a batch")

    source.batch = no_batch
    again = build_model("convnet", 1, 10, 8, options, 99, "cpu")
    assert train_soft(again, source, labels, protocol.config, make_generator(5),
                      checkpoint=RunCheckpoint(path, {"run": "soft"})) == whole_losses  # no batch replayed
    for name, value in whole.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
