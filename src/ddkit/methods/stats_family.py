"""SRe2L, CDA and G-VBSM: squeeze -> recover -> relabel as presets over shared stages.

A method is data: which teachers and how they are trained (squeeze), the recover options, the
relabel options and the evaluation recipe. The three stages are separate functions (and CLI
commands) and ``distill`` chains them:

1. :func:`method_teachers` trains or loads the teacher pool (:mod:`ddkit.methods.squeeze`, cached);
2. :class:`ddkit.methods.recover.RecoverEngine` recovers the images;
3. :func:`ddkit.methods.relabel.relabel` stores per-(epoch, sample) soft-label records from the
   whole pool, which ``ddkit eval --protocol soft`` replays under the method's evaluation recipe
   (:data:`ddkit.evaluate.soft.SOFT_RECIPES`).

Each method's ``paper`` preset is the published recipe of that method on the closest published
dataset, its *reference* (:func:`reference_for`): the dataset itself when the paper covers it
(SRe2L: CIFAR-100, Tiny-ImageNet; CDA: Tiny-ImageNet; G-VBSM: CIFAR-10, CIFAR-100,
Tiny-ImageNet), else the one of the same image size (and, for G-VBSM's 32 px sets, class count).
The ``quick`` and ``smoke`` tiers run the same algorithm made smaller (:data:`TIERS`): reduced
teacher widths and epochs on a subset, fewer recover iterations, fewer relabel and evaluation
epochs, conv targets from a subset.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from ddkit import distributed
from ddkit.augment.crops import padding_for
from ddkit.data import dataset_info
from ddkit.data.registry import DATASETS, resolve_name
from ddkit.errors import DDKitError
from ddkit.methods.dm_family import deep_merge
from ddkit.methods.pretrained import check_class_order, load_external_teacher, resolve_teacher
from ddkit.methods.recover import RecoverEngine, StatisticsHooks, conv_modules
from ddkit.methods.registry import MethodSpec, register
from ddkit.methods.relabel import auto_flip_prob, relabel
from ddkit.methods.squeeze import build_net, cache_folder, recipe_for, train_cached
from ddkit.methods.terms import recover_weight_defaults
from ddkit.tiers import check_tier, check_tier_table
from ddkit.models import available
from ddkit.store import DistilledSet
from ddkit.utils import apply_overrides, check_number, override_items

#: Recover options shared by the family; each method's published values are in :data:`PUBLISHED`. The
#: weights of the loss terms (``r_bn`` 1, ``r_conv`` 0, ``densify_weight`` 0) come with the terms
#: (:func:`ddkit.methods.terms.recover_term`), added by :func:`recover_defaults`.
RECOVER_DEFAULTS: dict = {
    "iterations": 4000, "lr": 0.1, "betas": [0.5, 0.9], "batch_size": 100, "batch_mode": "spread",
    "first_multiplier": 10.0, "stat_norm": "l2",
    "crop": "resized", "crop_scale_min": 0.08, "crop_padding": "auto", "crop_per_sample": False, "flip": "auto",
    "jitter": 4, "jitter_mode": "positive", "curriculum": "none", "milestone": 1.0,
    # G-VBSM's conv statistics: patch_form reference (patch_size pixels, pooled over batch and
    # channels) or ddkit's cells (patch_cells per side and channel, patch_policy for misfits)
    "patch_form": "reference", "patch_size": 4, "patch_cells": 4, "patch_policy": "fit",
    "conv_drop": 0.0, "conv_target_images": 0, "conv_target_batch": 64, "conv_target_seed": 0,
    "ema_alpha": None, "ema_scope": "run", "legacy_ema_zero_start": False,
    "densify_pool": 32, "densify_temperature": 4.0, "densify_form": "reference",
    "log_every": 10,
}
#: Relabel options (FKD records; one epoch of records per student epoch of the soft protocol).
#: ``shard_epochs`` > 0 writes the records in shards of that many epochs (a storage choice, the
#: records are the same; :mod:`ddkit.methods.shards`); the ImageNet presets shard by 10.
#: ``eval_loss`` and ``eval_recipe`` are what ``ddkit eval --protocol soft`` uses for the set.
RELABEL_DEFAULTS: dict = {"epochs": 1000, "crop": "resized", "crop_scale_min": 0.08, "crop_padding": "auto",
                          "mix": "cutmix", "mix_beta": 1.0, "topk": None, "equalize_norm": False, "batch_size": 256,
                          "eval_loss": "kl", "eval_recipe": "ddkit", "shard_epochs": 0}
#: Teacher training options shared by the papers' recipes (SGD; :func:`ddkit.methods.squeeze.train_teacher`).
SQUEEZE_DEFAULTS: dict = {"epochs": 50, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "batch_size": 64,
                          "schedule": "constant", "warmup_epochs": 0, "warmup_start": 0.01, "crop": "padded",
                          "crop_padding": "auto", "crop_scale_min": 0.08, "flip": "auto", "train_subset": 0,
                          "sync_bn": False}

#: ResNet-18 with a 3x3 stem and no max-pool: SRe2L's modified torchvision network and G-VBSM's CRD one
RESNET18 = {"arch": "resnet18_bn"}
#: G-VBSM's pool in its official order (ResNet18, ConvNetW128, MobileNetV2 x0.5, WRN-16-2, ShuffleNetV2 x0.5)
GVBSM_POOL = [RESNET18, {"arch": "convnet", "width": 128, "norm": "instance", "depth": None},
              {"arch": "mobilenetv2_crd", "width_mult": 0.5}, {"arch": "wrn16_2"}, {"arch": "shufflenetv2_crd", "width_mult": 0.5}]

_SRE2L_TINY_TEACHER = {"epochs": 50, "lr": 0.2, "weight_decay": 1e-4, "batch_size": 256, "schedule": "cosine_epoch",
                       "warmup_epochs": 5, "crop": "resized"}
_GVBSM_RECOVER = {"iterations": 4000, "lr": 0.05, "r_bn": 0.01, "r_conv": 0.01, "crop": "padded", "jitter": 32,
                  "conv_drop": 0.4, "ema_alpha": 0.8, "densify_weight": 1.0, "batch_mode": "class-major"}

#: The published recipe of each (method, reference dataset): teachers, squeeze, recover, relabel.
PUBLISHED: dict[tuple[str, str], dict] = {
    # SRe2L, small_dataset/{squeeze,recover,relabel}_cifar.py: the teacher 200 epochs, SGD 0.1,
    # cosine, RandomCrop(32, 4) + flip; recover 1000 it, lr 0.25, r_bn 0.01, no crop, no flip, roll
    # 0..4; the student online on mixup(0.8) of RandomCrop(32, 4) + flip for 400 epochs
    ("sre2l", "cifar100"): {
        "teachers": [RESNET18],
        "squeeze": {"epochs": 200, "lr": 0.1, "weight_decay": 5e-4, "batch_size": 128, "schedule": "cosine_epoch"},
        "recover": {"iterations": 1000, "lr": 0.25, "r_bn": 0.01, "crop": "none", "flip": False},
        "relabel": {"epochs": 400, "crop": "padded", "mix": "mixup", "mix_beta": 0.8, "eval_recipe": "sre2l-cifar100"},
    },
    # SRe2L on Tiny-ImageNet (zeyuanyin/tiny-imagenet): the teacher 50 epochs, SGD 0.2, 5 warm-up
    # epochs then cosine, RandomResizedCrop + flip; recover 4000 it, lr 0.1, r_bn 1, roll -4..4;
    # the student online on RandomResizedCrop + flip, no mixing, 100 epochs
    ("sre2l", "tiny"): {
        "teachers": [RESNET18],
        "squeeze": _SRE2L_TINY_TEACHER,
        "recover": {"iterations": 4000, "lr": 0.1, "r_bn": 1.0, "crop": "resized", "jitter_mode": "symmetric"},
        "relabel": {"epochs": 100, "crop": "resized", "mix": "none", "eval_recipe": "sre2l-tiny"},
    },
    # CDA, recover_cda_tiny.py: SRe2L's Tiny teacher, relabel and evaluation (CDA/README: "we follow
    # SRe2L"), lr 0.4, r_bn 0.05, cosine curriculum to milestone 1, roll 0..4
    ("cda", "tiny"): {
        "teachers": [RESNET18],
        "squeeze": _SRE2L_TINY_TEACHER,
        "recover": {"iterations": 4000, "lr": 0.4, "r_bn": 0.05, "crop": "resized", "curriculum": "cosine",
                    "milestone": 1.0},
        "relabel": {"epochs": 100, "crop": "resized", "mix": "none", "eval_recipe": "sre2l-tiny"},
    },
    # G-VBSM, Branch_CIFAR_100: the pool 50 epochs, SGD 0.05, wd 0, batch 64, constant lr,
    # RandomCrop(32, 4) + flip; recover 4000 it, lr 0.05, r_loss 0.01, RandomCrop(32, 4) + flip and
    # roll 0..32, drop 0.4, EMA 0.8, densification 1; relabel 1000 epochs of CutMix, MSE + 0.15 CE
    ("gvbsm", "cifar100"): {
        "teachers": GVBSM_POOL,
        "squeeze": {},
        "recover": _GVBSM_RECOVER,
        "relabel": {"epochs": 1000, "eval_loss": "mse_ce", "eval_recipe": "gvbsm-cifar100"},
    },
    # Branch_CIFAR_10: as CIFAR-100 with teachers squeezed for 5 epochs
    ("gvbsm", "cifar10"): {
        "teachers": GVBSM_POOL,
        "squeeze": {"epochs": 5},
        "recover": _GVBSM_RECOVER,
        "relabel": {"epochs": 1000, "eval_loss": "mse_ce", "eval_recipe": "gvbsm-cifar10"},
    },
    # Branch_Tiny_ImageNet: the pool 50 epochs, SGD 0.1, batch 128, cosine per epoch,
    # RandomCrop(64, 8) + flip; recover as CIFAR (padding 8) with the IPC cut in ten groups per
    # batch; relabel 100 epochs, MSE + 0.1 CE
    ("gvbsm", "tiny"): {
        "teachers": GVBSM_POOL,
        "squeeze": {"lr": 0.1, "batch_size": 128, "schedule": "cosine_epoch"},
        "recover": {**_GVBSM_RECOVER, "batch_mode": "class-tenths"},
        "relabel": {"epochs": 100, "eval_loss": "mse_ce", "eval_recipe": "gvbsm-tiny"},
    },
}
#: torchvision's ImageNet-1K weights as a preset teacher: ddkit's twin network (torchvision's keys)
#: loaded with them, or torchvision's own network where ddkit has no twin
def _torchvision_teacher(name: str, arch: str | None = None) -> dict:
    return {"arch": arch or f"torchvision:{name}", "pretrained": f"torchvision:{name}"}


#: A teacher the user supplies with ``--teacher ARCH:FILE`` (no package publishes it)
USER_TEACHER = "user"
_SRE2L_IMAGENET_RECOVER = {"iterations": 4000, "lr": 0.25, "r_bn": 0.01, "batch_size": 100, "crop": "resized",
                           "jitter": 32, "jitter_mode": "positive", "first_multiplier": 10.0, "batch_mode": "spread"}
#: SRe2L relabel/generate_soft_label.py: 300 epochs of RandomResizedCrop(0.08-1) + flip + CutMix, fp16
_SRE2L_IMAGENET_RELABEL = {"epochs": 300, "crop": "resized", "crop_scale_min": 0.08, "mix": "cutmix",
                           "mix_beta": 1.0, "eval_recipe": "sre2l-imagenet", "shard_epochs": 10}
PUBLISHED.update({
    # SRe2L recover/recover.sh: torchvision's pretrained ResNet-18; 4000 it, Adam lr 0.25, r_bn 0.01,
    # batch 100 (one image of each of 100 classes), RandomResizedCrop + flip per batch, roll 0..32,
    # x10 on the first BN; relabel 300 epochs (CutMix); student: validate/train_FKD.sh
    ("sre2l", "imagenet1k"): {
        "teachers": [_torchvision_teacher("resnet18", "imagenet_resnet18")],
        "squeeze": {},
        "recover": _SRE2L_IMAGENET_RECOVER,
        "relabel": _SRE2L_IMAGENET_RELABEL,
    },
    # CDA README (recover_cda_in1k.py): as SRe2L with the cosine curriculum to milestone 1
    ("cda", "imagenet1k"): {
        "teachers": [_torchvision_teacher("resnet18", "imagenet_resnet18")],
        "squeeze": {},
        "recover": {**_SRE2L_IMAGENET_RECOVER, "curriculum": "cosine", "milestone": 1.0},
        "relabel": _SRE2L_IMAGENET_RELABEL,
    },
    # CDA README (recover_cda_in21k.py): a ResNet-18 squeezed on ImageNet-21K-P (10450 classes, 80
    # epochs; the authors' checkpoint, given with --teacher imagenet_resnet18:FILE), 2000 it, lr 0.05,
    # r_bn 0.25, batch 100, cosine curriculum to milestone 1; relabel as SRe2L's ImageNet recipe
    ("cda", "imagenet21k"): {
        "teachers": [{"arch": "imagenet_resnet18", "pretrained": USER_TEACHER}],
        "squeeze": {},
        "recover": {**_SRE2L_IMAGENET_RECOVER, "iterations": 2000, "lr": 0.05, "r_bn": 0.25,
                    "curriculum": "cosine", "milestone": 1.0},
        "relabel": _SRE2L_IMAGENET_RELABEL,
    },
    # G-VBSM Branch_full_ImageNet_1k: torchvision's pretrained ResNet-18, MobileNetV2, EfficientNet-B0 and
    # ShuffleNetV2 x0.5 in turn; 4000 it, lr 0.1, batch 80, r_loss 0.01 on BN and Conv2d inputs with
    # 16-pixel patches, no conv drop, EMA 0.4, densification 1, RandomResizedCrop + flip per batch, roll
    # 0..32; conv targets over the whole training set (RandomResizedCrop, batches of 256); relabel 300
    # epochs of CutMix with the teachers' logits norm-equalised; student MSE + 0.1 CE (train/train.sh)
    ("gvbsm", "imagenet1k"): {
        "teachers": [_torchvision_teacher("resnet18", "imagenet_resnet18"),
                     _torchvision_teacher("mobilenet_v2", "imagenet_mobilenet_v2"),
                     _torchvision_teacher("efficientnet_b0", "imagenet_efficientnet_b0"),
                     {**_torchvision_teacher("shufflenet_v2_x0_5", "imagenet_shufflenet_v2"), "multiplier": "x0.5"}],
        "squeeze": {},
        "recover": {"iterations": 4000, "lr": 0.1, "r_bn": 0.01, "r_conv": 0.01, "batch_size": 80,
                    "batch_mode": "spread", "crop": "resized", "jitter": 32, "patch_form": "reference",
                    "patch_size": 16, "conv_drop": 0.0, "ema_alpha": 0.4, "densify_weight": 1.0,
                    "conv_target_images": 0, "conv_target_batch": 256},
        "relabel": {**_SRE2L_IMAGENET_RELABEL, "equalize_norm": True, "eval_loss": "mse_ce",
                    "eval_recipe": "gvbsm-imagenet"},
    },
})
#: the datasets each method's papers publish a recipe for (ddkit's dataset names; a streaming
#: ``imagenet:PATH`` / ``imagenet21k:PATH`` by its prefix, :func:`published_key`)
PUBLISHED_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "tiny-imagenet": "tiny",
                      "imagenet": "imagenet1k", "imagenet21k": "imagenet21k"}
#: the published results each ImageNet preset aims for (top-1 %, ResNet-18 student, by IPC;
#: CDA ImageNet-21K: the paper's IPC 20 result)
PUBLISHED_ACCURACY = {
    ("sre2l", "imagenet1k"): {10: 21.3, 50: 46.8, 100: 52.8},
    ("cda", "imagenet1k"): {50: 53.5, 100: 58.0, 200: 63.3},
    ("cda", "imagenet21k"): {20: 36.1},
    ("gvbsm", "imagenet1k"): {10: 31.4, 50: 51.8, 100: 55.7},
}


def published_key(name: str) -> str | None:
    """The :data:`PUBLISHED_DATASETS` reference of dataset ``name`` (``imagenet:PATH`` -> imagenet1k)."""
    return PUBLISHED_DATASETS.get(name.split(":", 1)[0] if ":" in name else name)

#: The smaller tiers: teacher pools of reduced width, and what each tier shrinks. ``caps`` lower a
#: published count to at most the value; ``sets`` replace an option.
QUICK_TEACHERS = {
    "single": [{"arch": "convnet", "width": 32, "norm": "batch", "depth": None}],
    # reduced sizes of the G-VBSM pool; MobileNetV2 and ShuffleNetV2 cost 2-4x more per image on
    # this CPU and are left out of the quick pool (they stay in the paper pool)
    "pool": [{"arch": "convnet", "width": 32, "norm": "batch", "depth": None}, {"arch": "resnet18_bn", "width": 8},
             {"arch": "wrn16_2", "width": 8}, {"arch": "convnet", "width": 32, "norm": "instance", "depth": None}],
}
SMOKE_TEACHERS = {
    "single": [{"arch": "convnet", "width": 8, "norm": "batch", "depth": None}],
    "pool": [{"arch": "convnet", "width": 8, "norm": "batch", "depth": None}, {"arch": "resnet18_bn", "width": 4}],
}
TIERS: dict[str, dict] = check_tier_table({
    "paper": {"teachers": None, "caps": {}, "sets": {}},
    "quick": {"teachers": QUICK_TEACHERS,
              "caps": {"squeeze.epochs": 2, "recover.iterations": 500, "relabel.epochs": 300},
              "sets": {"squeeze.train_subset": 20000, "recover.conv_target_images": 5000}},
    "smoke": {"teachers": SMOKE_TEACHERS,
              "caps": {"squeeze.epochs": 6, "recover.iterations": 3, "relabel.epochs": 20},
              "sets": {"squeeze.train_subset": 1500, "recover.conv_target_images": 200, "recover.log_every": 1}},
}, "TIERS")
METHODS = ("sre2l", "cda", "gvbsm")
STAGES = ("teachers", "squeeze", "recover", "relabel")


def recover_defaults() -> dict:
    """:data:`RECOVER_DEFAULTS` with the default weight of every registered recover term."""
    return {**recover_weight_defaults(), **RECOVER_DEFAULTS}


def dataset_facts(dataset: str, real=None):
    """What the presets need to know of ``dataset``: ``name``, ``image_shape`` ``(C, H, W)`` and
    ``num_classes``, from ``real`` when given, else from the dataset registry's metadata (no file
    is read; an ``imagefolder:`` dataset is read to be described)."""
    if real is not None:
        return SimpleNamespace(name=real.name, image_shape=tuple(real.image_shape), num_classes=int(real.num_classes))
    name, folder = resolve_name(dataset)
    if folder is not None:
        info = dataset_info(dataset)
        return SimpleNamespace(name=name, image_shape=tuple(info["image_shape"]), num_classes=info["num_classes"])
    spec = DATASETS[name]
    return SimpleNamespace(name=name, image_shape=tuple(spec.image_shape), num_classes=int(spec.num_classes))


def reference_for(method: str, dataset: str, real=None) -> tuple[str, str]:
    """``(reference, why)``: the published dataset whose recipe ``method`` uses on ``dataset``.

    The dataset itself when ``method``'s paper has a recipe for it; otherwise, by image size:
    SRe2L takes CIFAR-100's for sets of 32 px or less and Tiny-ImageNet's above; CDA publishes
    only Tiny-ImageNet (and ImageNet) and takes Tiny-ImageNet's; G-VBSM takes CIFAR-10's for
    sets of 32 px or less with at most 10 classes, CIFAR-100's for other small sets, and
    Tiny-ImageNet's above 32 px.
    """
    if method not in METHODS:
        raise DDKitError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    facts = dataset_facts(dataset, real)
    name, size, classes = facts.name, int(facts.image_shape[1]), facts.num_classes
    published = published_key(name)
    if published is not None and (method, published) in PUBLISHED:
        return published, f"{method}'s published recipe for {name.split(':', 1)[0]}"
    if published == "imagenet21k":
        return "imagenet1k", f"{method} publishes no ImageNet-21K recipe; its ImageNet-1K one"
    if method == "cda":
        return "tiny", "CDA publishes Tiny-ImageNet and ImageNet recipes only"
    if size > 32:
        return "tiny", f"the published recipe of the closest image size ({size} px: Tiny-ImageNet, 64 px)"
    if method == "gvbsm" and classes <= 10:
        return "cifar10", f"the published recipe of the closest set ({size} px, {classes} classes: CIFAR-10)"
    return "cifar100", f"the published recipe of the closest image size ({size} px: CIFAR-100, 32 px)"


def resolve_preset(method: str, dataset: str, ipc: int | None = None, preset: str | None = None, overrides=None,
                   real=None) -> dict:
    """The full configuration ``{reference, teachers, squeeze, recover, relabel}`` of ``method`` at ``preset``.

    The same signature as :func:`ddkit.methods.dm_family.resolve_preset`; ``ipc`` does not change
    this family's recipes (None is fine). The earlier spelling without it,
    ``resolve_preset(method, dataset, preset, overrides)``, still works.

    ``paper`` is :data:`PUBLISHED` for the reference of :func:`reference_for`; the other tiers
    apply :data:`TIERS`. ``real`` (optional) supplies the image size and class count of a dataset
    the registry does not describe. Overrides are ``key=value`` strings or a dict; recover options
    may be given bare (``lr=0.1``) or qualified (``recover.lr=0.1``, ``relabel.epochs=50``,
    ``squeeze.epochs=3``). ``reference=NAME`` takes another published recipe of ``method`` as the
    starting point (``reference=cifar100`` on CIFAR-10), before the other overrides.
    """
    if isinstance(ipc, str):  # the earlier spelling: (method, dataset, preset, overrides)
        ipc, preset, overrides = None, ipc, preset if overrides is None else overrides
    if method not in METHODS:
        raise DDKitError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    check_tier(preset)
    overrides = _qualify(overrides)
    reference = (overrides or {}).pop("reference", None) or reference_for(method, dataset, real)[0]
    if (method, reference) not in PUBLISHED:
        known = ", ".join(name for m, name in PUBLISHED if m == method)
        raise DDKitError(f"{method} option reference={reference!r} is not valid; {method} publishes recipes for: "
                         f"{known}")
    published, tier = PUBLISHED[(method, reference)], TIERS[preset]
    squeeze = deep_merge(SQUEEZE_DEFAULTS, published["squeeze"])
    config = {
        "reference": reference,
        "teachers": copy.deepcopy(published["teachers"] if tier["teachers"] is None
                                  else tier["teachers"]["pool" if method == "gvbsm" else "single"]),
        "squeeze": squeeze,
        "recover": deep_merge(recover_defaults(), published["recover"]),
        "relabel": deep_merge(RELABEL_DEFAULTS, published["relabel"]),
    }
    published_epochs = squeeze["epochs"]
    for key, cap in tier["caps"].items():
        stage, name = key.split(".")
        config[stage][name] = min(config[stage][name], cap)
    for key, value in tier["sets"].items():
        stage, name = key.split(".")
        config[stage][name] = value
    if squeeze["warmup_epochs"]:  # the warm-up keeps its share of a shortened squeeze
        share = squeeze["warmup_epochs"] / published_epochs
        squeeze["warmup_epochs"] = min(squeeze["epochs"] - 1, round(share * squeeze["epochs"]))
    return apply_overrides(config, overrides, what=f"{method} option")


def _qualify(overrides):
    """Bare option names address the recover stage (``reference`` stays itself)."""
    if overrides is None:
        return None
    items = override_items(overrides)
    return {(k if k.split(".")[0] in STAGES or k == "reference" else f"recover.{k}"): v for k, v in items}


def method_teachers(real, config: dict, seed: int, device, show_progress: bool = True, compiled: bool = False) -> list:
    """Train or load every teacher of ``config["teachers"]`` (cached by dataset, model and recipe;
    ``compiled``: a teacher not cached yet trains through torch.compile)."""
    if not config["teachers"]:
        raise DDKitError("the teacher list is empty; give at least one model")
    if any(model.get("pretrained") for model in config["teachers"]):  # the ImageNet presets' published teachers
        if any(model.get("pretrained") == USER_TEACHER for model in config["teachers"]):
            arch = next(m["arch"] for m in config["teachers"] if m.get("pretrained") == USER_TEACHER)
            raise DDKitError(f"this recipe's teacher is a {arch} trained on {real.name.split(':', 1)[0]} that no "
                             f"package ships; give its weights with --teacher {arch}:FILE.pth (or .safetensors)")
        return [load_external_teacher(model["pretrained"], real, device) if model.get("pretrained") else
                train_cached(real, model, config["squeeze"], seed=seed + i, device=device, kind="teachers",
                             show_progress=show_progress, compiled=compiled)
                for i, model in enumerate(config["teachers"])]
    return [train_cached(real, model, config["squeeze"], seed=seed + i, device=device, kind="teachers",
                         show_progress=show_progress, desc=f"squeeze {model.get('arch', 'convnet')}",
                         compiled=compiled)
            for i, model in enumerate(config["teachers"])]


def teacher_keys(config: dict, dataset: str, seed: int = 0, real=None) -> list[str]:
    """The cache folder names (``<arch>-<hash>``) of the teachers :func:`method_teachers` would
    train or load for ``config``, from the dataset registry's metadata (no file is read); they
    change with the recipe, as the teachers do."""
    real = dataset_facts(dataset, real)
    return [cache_folder("teachers", real, recipe_for(real, model, config["squeeze"], seed + i)).name
            for i, model in enumerate(config["teachers"])]


def _augmentation_text(options: dict, dataset: str, size: int, per: str) -> str:
    """How a stage crops and flips (recover, squeeze or relabel options), in words."""
    padding = padding_for(size) if options.get("crop_padding", "auto") == "auto" else int(options["crop_padding"])
    crop = {"resized": f"RandomResizedCrop (scale {options.get('crop_scale_min', 0.08):g}-1)",
            "padded": f"RandomCrop padded {padding} px", "none": "no crop"}[options.get("crop", "none")]
    flip = options.get("flip", "auto")
    if flip == "auto":
        flip = "flip" if auto_flip_prob(dataset, None) else "no flip (a digit set)"
    else:
        flip = "flip" if flip else "no flip"
    return f"{crop} + {flip}, {per}"


def _schedule_text(options: dict) -> str:
    schedule = {"constant": "constant lr", "cosine_epoch": "cosine lr per epoch", "cosine": "cosine lr per step",
                "step": "step lr"}[options["schedule"]]
    if options.get("warmup_epochs"):
        schedule = f"{options['warmup_epochs']} linear warm-up epochs, then {schedule}"
    return schedule


def describe_plan(method: str, dataset: str, preset: str, overrides=None, seed: int = 0, describe_recipe=None) -> list[str]:
    """What ``ddkit distill METHOD --plan`` prints: the resolved configuration in words.

    The reference recipe and why, the teachers (with their first hooked module and cache keys),
    the squeeze recipe, the recover statistics and augmentation, the relabel views and the
    evaluation recipe (``describe_recipe(name)`` adds its options, when given). Reads the dataset
    registry's metadata only: no image is loaded and nothing trains.
    """
    real = dataset_facts(dataset)
    config = resolve_preset(method, dataset, None, preset, overrides, real=real)
    name, (channels, size, _), classes = real.name, real.image_shape, real.num_classes
    reference, why = reference_for(method, dataset, real)
    if config["reference"] != reference:
        reference = config["reference"]
        why = f"{method}'s published recipe for {reference}, chosen with --set reference={reference}"
    sq, rc, rl = config["squeeze"], config["recover"], config["relabel"]
    lines = [f"{method} on {name} ({channels}x{size}x{size}, {classes} classes), preset {preset}: "
             f"{why} (reference {reference})"]
    lines.append(f"teachers ({len(config['teachers'])}, one per iteration in turn; cached in "
                 f"$DDKIT_DATA/teachers/{name}/):")
    for model, key in zip(config["teachers"], teacher_keys(config, dataset, seed, real)):
        if model.get("pretrained"):
            where = ("--teacher ARCH:FILE (yours)" if model["pretrained"] == USER_TEACHER
                     else f"{model['pretrained']} (pretrained, its package's cache)")
            key = f"from {where}"
        if model["arch"] not in available():
            lines.append(f"  {key}: {model['arch']}; its hooks are counted when it is loaded")
            continue
        net = build_net(model, real, seed=0, device="cpu")
        hooks = StatisticsHooks(net, rc, [None] * len(conv_modules(net)) if float(rc["r_conv"]) > 0 else None)
        names = {module: module_name for module_name, module in net.named_modules()}
        first = f"{names[hooks.modules[0]]} ({type(hooks.modules[0]).__name__})" if hooks.modules else "none"
        options = ", ".join(f"{k}={v}" for k, v in model.items() if k != "arch" and v is not None)
        lines.append(f"  {key}: {model['arch']}({options}); {len(hooks.modules)} hooked modules, x{rc['first_multiplier']:g} on "
                     f"the first, {first}")
    if all(model.get("pretrained") for model in config["teachers"]):
        lines.append("squeeze: none (the published teachers are pretrained)")
    else:
        lines.append(f"squeeze: SGD lr {sq['lr']:g} momentum {sq['momentum']:g} wd {sq['weight_decay']:g}, batch "
                     f"{sq['batch_size']}, {sq['epochs']} epochs, {_schedule_text(sq)}"
                     + (f", on {sq['train_subset']} images" if sq["train_subset"] else "")
                     + f"; {_augmentation_text(sq, name, size, 'per image')}")
    jitter = f"0..{rc['jitter']}" if rc["jitter_mode"] == "positive" else f"-{rc['jitter']}..{rc['jitter']}"
    curriculum = (f", CDA {rc['curriculum']} curriculum to milestone {rc['milestone']:g}"
                  if rc["curriculum"] != "none" else "")
    lines.append(f"recover: {rc['iterations']} iterations, Adam lr {rc['lr']:g} (betas {rc['betas'][0]:g}, "
                 f"{rc['betas'][1]:g}; cosine to 0), batches of {rc['batch_size']} ({rc['batch_mode']})")
    lines.append(f"  augmentation: {_augmentation_text(rc, name, size, 'one per image' if rc['crop_per_sample'] else 'one per batch')}"
                 f"{curriculum}, then a cyclic roll of {jitter} px")
    statistics = [f"r_bn {rc['r_bn']:g} x BatchNorm inputs (mean, biased variance vs running statistics)"]
    if float(rc["r_conv"]) > 0:
        patch = (f"{rc['patch_size']}x{rc['patch_size']}-pixel patches pooled over batch and channels"
                 if rc["patch_form"] == "reference" else f"{rc['patch_cells']}x{rc['patch_cells']} cells per channel")
        statistics.append(f"r_conv {rc['r_conv']:g} x Conv2d inputs (channel mean, variance and {patch}; targets "
                          f"over {rc['conv_target_images'] or 'all'} training images, "
                          + (f"mean of batch-of-{rc['conv_target_batch']} statistics" if rc["conv_target_batch"]
                             else "pooled exactly") + f", drop {rc['conv_drop']:g})")
    statistics.append(f"x{rc['first_multiplier']:g} on the first hooked module, {rc['stat_norm']} distances")
    if rc["ema_alpha"] is not None:
        statistics.append(f"EMA {rc['ema_alpha']:g} over the whole {rc['ema_scope']}, starting at "
                          + ("0 (legacy)" if rc["legacy_ema_zero_start"] else "the first statistic"))
    lines.append("  statistics: " + "; ".join(statistics))
    if float(rc["densify_weight"]) > 0:
        form = ("published form: tempered target detached, summed over classes" if rc["densify_form"] == "reference"
                else "ddkit's unit-norm form, averaged over classes")
        lines.append(f"  densification: weight {rc['densify_weight']:g}, tau {rc['densify_temperature']:g}, the augmented "
                     f"batch pooled to {rc['densify_pool']} px, {form}")
    mix = "no mixing" if rl["mix"] == "none" else f"{rl['mix']} (beta {rl['mix_beta']:g})"
    lines.append(f"relabel: {rl['epochs']} epochs of {_augmentation_text(rl, name, size, 'per image')} + {mix}; "
                 f"the teachers' mean logits in fp16")
    recipe = f"evaluation: --protocol soft, recipe {rl['eval_recipe']}"
    if describe_recipe is not None:
        recipe += f" ({describe_recipe(rl['eval_recipe']).split(None, 1)[1]})"
    lines.append(recipe)
    aims = PUBLISHED_ACCURACY.get((method, reference))
    if aims and preset == "paper":
        lines.append("published top-1 (ResNet-18 student): "
                     + ", ".join(f"IPC {ipc}: {accuracy:g} %" for ipc, accuracy in aims.items()))
    return lines


def outside_teachers(specs, real, device, class_check: bool = True) -> list:
    """The teachers of ``--teacher`` values (folders, ``torchvision:NAME``, ``timm:NAME``,
    ``ARCH:FILE``), each checked by :func:`ddkit.methods.pretrained.check_class_order` unless
    ``class_check`` is False (a teacher from outside may order its classes differently)."""
    teachers = [resolve_teacher(spec, real, device) for spec in specs]
    if class_check:
        for teacher in teachers:
            check_class_order(teacher, real, device)
    return teachers


def check_pretrained(teachers, config: dict, real, device) -> None:
    """:func:`ddkit.methods.pretrained.check_class_order` for the preset's pretrained teachers
    (those ddkit trains on the dataset itself have its class order by construction)."""
    for teacher, model in zip(teachers, config["teachers"]):
        if model.get("pretrained"):
            check_class_order(teacher, real, device)


def shard_staging(near) -> str | None:
    """A new folder beside ``near``'s parent for relabel shards until the set is saved (on the same
    disk as the set, not the system's temporary directory), or None without ``near``."""
    if near is None or not distributed.current().is_main:  # under torchrun, rank 0's folder serves all
        return None
    parent = Path(near).resolve().parent.parent
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkdtemp(prefix=".ddkit-relabel-", dir=parent)


def relabel_with(distilled, teachers, config: dict, seed: int, device, show_progress: bool = True,
                 shard_dir=None):
    """Relabel ``distilled`` with the pool and the method's relabel options (records in ``extras``,
    or in shards written to ``shard_dir`` with ``shard_epochs`` > 0, see :func:`ddkit.methods.relabel.relabel`)."""
    options = config["relabel"]
    # relabel() checks its own arguments; this key only exists here, as the low end of crop_scale.
    check_number("relabel", "crop_scale_min", options["crop_scale_min"], minimum=0, maximum=1)
    result = relabel(distilled, [t.model for t in teachers], epochs=options["epochs"], seed=seed,
                     crop_scale=(options["crop_scale_min"], 1.0), mix=options["mix"],
                     mix_beta=options["mix_beta"], topk=options["topk"],
                     equalize_norm=options["equalize_norm"], batch_size=options["batch_size"],
                     device=device, teacher_info=[t.info() for t in teachers], eval_loss=options["eval_loss"],
                     show_progress=show_progress, crop=options["crop"], crop_padding=options["crop_padding"],
                     eval_recipe=options["eval_recipe"], shard_epochs=options.get("shard_epochs", 0),
                     shard_dir=shard_dir)
    return result


def recover_set(method: str, real, ipc: int, config: dict, teachers, seed: int, device, show_progress: bool = True,
                checkpoint: dict | None = None):
    """Recover ``ipc`` images per class (no soft labels yet) as a DistilledSet.

    ``checkpoint``: per-batch checkpoints and resume, see :meth:`RecoverEngine.run`."""
    engine = RecoverEngine(real, ipc, config["recover"], teachers, seed, device, show_progress)
    images, labels, record = engine.run(checkpoint)
    result = DistilledSet(
        images=images, labels=labels, class_names=list(real.class_names), dataset=real.name, mean=real.mean,
        std=real.std, method=method,
        meta={"config": config, "seeds": {"run": seed}, "teachers": [t.info() for t in teachers],
              "timings": {"recover_seconds": record["recover_seconds"],
                          "seconds_per_iteration": record["seconds_per_iteration"]},
              "status": "complete", "loss_log": record["loss_log"]},
    )
    result.computed_rows = record["rows"]  # transient: which images this process recovered
    return result


def distill_statistics(method: str):
    """The registered entry point of one statistics-matching method (all three stages)."""

    def run(real, ipc, preset="quick", overrides=None, seed=0, device="cpu", show_progress=True, relabel=True,
            teacher_paths=None, merge_parts=None, checkpoint=None, compiled=False, class_check=True):
        config = resolve_preset(method, real.name, ipc, preset, overrides, real=real)
        started = time.perf_counter()
        if teacher_paths:
            teachers = outside_teachers(teacher_paths, real, device, class_check)
            config["teachers"] = [t.model_config for t in teachers]
        else:
            # under torchrun the ranks train missing teachers together (DDP); rank 0 writes the cache
            teachers = method_teachers(real, config, seed, device, show_progress, compiled=compiled)
            if class_check:
                check_pretrained(teachers, config, real, device)
        squeeze_seconds = time.perf_counter() - started
        result = recover_set(method, real, ipc, config, teachers, seed, device, show_progress, checkpoint)
        if merge_parts is not None:
            merge_parts(result)  # every rank now holds every recovered image
        if relabel:  # every rank labels its share of the merged set's views (relabel splits them)
            started = time.perf_counter()
            result = relabel_with(result, teachers, config, seed, device, show_progress,
                                  shard_dir=shard_staging(checkpoint["dir"] if checkpoint and
                                                          config["relabel"]["shard_epochs"] else None))
            result.meta["timings"]["relabel_seconds"] = round(time.perf_counter() - started, 3)
        result.meta["timings"]["squeeze_seconds"] = round(squeeze_seconds, 3)
        return result

    run.__doc__ = (f"Distill with {method}: squeeze (cached) -> recover -> relabel; "
                   "``compiled``: teachers not cached yet train through torch.compile.")
    return run


for _name in METHODS:
    # checkpoints: the recover step (teachers are cached and relabel is redone); merges_parts:
    # relabel needs every recovered image, so the parts are merged before it
    register(MethodSpec(name=_name, run=distill_statistics(_name), family="statistics", protocol="soft",
                        resolve=lambda dataset, ipc, preset, overrides=None, _m=_name: resolve_preset(
                            _m, dataset, ipc, preset, overrides),
                        checkpoints=True, compile=True, splits_work=True, merges_parts=True, relabel_baseline=True,
                        summary=f"{_name}: squeeze -> recover -> relabel"))
