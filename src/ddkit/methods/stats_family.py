"""SRe2L, CDA and G-VBSM: squeeze -> recover -> relabel as presets over shared stages.

A method is data (SPEC section 3): which teachers, the recover options and the relabel options.
The three stages are separate functions (and CLI commands) and ``distill`` chains them:

1. :func:`method_teachers` trains or loads the teacher pool (:mod:`ddkit.methods.squeeze`, cached);
2. :class:`ddkit.methods.recover.RecoverEngine` recovers the images;
3. :func:`ddkit.methods.relabel.relabel` stores per-(epoch, sample) soft-label records from the
   whole pool, which ``ddkit eval --protocol soft`` replays.

Tiers: ``paper`` takes the published settings of the closest published dataset (Tiny-ImageNet's
recipes for 28-64 px sets, CIFAR's for CIFAR); ``quick`` fits Fashion-MNIST IPC 10 end to end
(teachers included) into about 20 minutes of two CPU cores with reduced-size teachers and fewer
iterations; ``smoke`` takes seconds.
"""

from __future__ import annotations

import copy

from ddkit.errors import DDKitError
from ddkit.methods.dm_family import deep_merge
from ddkit.methods.registry import register_method
from ddkit.methods.squeeze import SQUEEZE_PRESETS, load_teacher, train_cached
from ddkit.utils import apply_overrides, check_number, override_items

#: Recover options shared by the family (= SRe2L's Tiny-ImageNet recipe, SPEC 3.1).
RECOVER_DEFAULTS: dict = {
    "iterations": 4000, "lr": 0.1, "betas": [0.5, 0.9], "batch_size": 100, "batch_mode": "spread",
    "r_bn": 1.0, "first_bn_multiplier": 10.0, "stat_norm": "l2",
    "crop": True, "crop_scale_min": 0.08, "crop_per_sample": False, "flip": "auto", "jitter": 4,
    "curriculum": "none", "milestone": 1.0,
    "r_conv": 0.0, "patch_cells": 4, "patch_policy": "fit", "conv_drop": 0.0, "conv_target_images": 0,
    "conv_target_seed": 0, "ema_alpha": None,
    # densify_normalize: unit-norm rows before the Gram matrix; the literal SPEC formula (False) is
    # numerically a no-op at real image scale (eigenvalues in the thousands, one-hot softmaxes).
    "densify_weight": 0.0, "densify_pool": 32, "densify_temperature": 4.0, "densify_normalize": True,
    "log_every": 10,
}
#: Relabel options (FKD records; one epoch of records per student epoch of the soft protocol).
RELABEL_DEFAULTS: dict = {"epochs": 1000, "crop_scale_min": 0.08, "mix": "cutmix", "mix_beta": 1.0, "topk": None,
                          "equalize_norm": False, "batch_size": 256, "eval_loss": "kl"}

PAPER_TEACHERS = {
    "single": [{"arch": "resnet18_bn"}],
    "pool": [{"arch": "resnet18_bn"}, {"arch": "convnet", "width": 128, "norm": "instance", "depth": None},
             {"arch": "mobilenetv2_crd", "width_mult": 0.5}, {"arch": "wrn16_2"}, {"arch": "shufflenetv2_crd", "width_mult": 0.5}],
}
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

METHOD_SETTINGS: dict[str, dict] = {
    "sre2l": {"pool": "single", "recover": {}, "relabel": {"eval_loss": "kl"}},
    "cda": {"pool": "single", "recover": {"lr": 0.4, "r_bn": 0.05, "curriculum": "cosine", "milestone": 1.0},
            "relabel": {"eval_loss": "kl"}},
    "gvbsm": {"pool": "pool",
              "recover": {"lr": 0.05, "r_bn": 0.01, "r_conv": 0.01, "jitter": 32, "conv_drop": 0.4, "ema_alpha": 0.8,
                          "densify_weight": 1.0, "batch_mode": "class-major"},
              "relabel": {"eval_loss": "mse_ce"}},
}
#: Published settings that differ on CIFAR (SPEC 3.1 / 3.3).
PAPER_PER_DATASET: dict[tuple[str, str], dict] = {
    ("sre2l", "cifar100"): {"recover": {"iterations": 1000, "lr": 0.25, "r_bn": 0.01, "crop": False}},
}
TIERS: dict[str, dict] = {
    "paper": {"teachers": PAPER_TEACHERS, "recover": {}, "relabel": {"epochs": 1000}},
    "quick": {"teachers": QUICK_TEACHERS, "recover": {"iterations": 500, "conv_target_images": 5000},
              "relabel": {"epochs": 300}},
    "smoke": {"teachers": SMOKE_TEACHERS, "recover": {"iterations": 3, "conv_target_images": 200, "log_every": 1},
              "relabel": {"epochs": 20}},
}
#: Tier settings that depend on the method. G-VBSM's published recover options (lr 0.05, statistics
#: weights 0.01, jitter 32) are tuned for 4000 iterations on 32 px images; in the quick tier's 500
#: iterations on 28 px images they leave the statistics unopposed and the jitter a full cyclic roll,
#: and the recovered images score below the random subset (docs/benchmarks.md, "G-VBSM quick preset").
TIER_METHOD_SETTINGS: dict[tuple[str, str], dict] = {
    ("gvbsm", "quick"): {"recover": {"lr": 0.1, "r_bn": 1.0, "r_conv": 1.0, "jitter": 4}},
}
METHODS = tuple(METHOD_SETTINGS)


def resolve_preset(method: str, dataset: str, preset: str, overrides=None) -> dict:
    """The full configuration ``{teachers, squeeze, recover, relabel}`` of ``method`` at ``preset``.

    Overrides are ``key=value`` strings or a dict; recover options may be given bare
    (``lr=0.1``) or qualified (``recover.lr=0.1``, ``relabel.epochs=50``, ``squeeze.epochs=3``).
    """
    if method not in METHOD_SETTINGS:
        raise DDKitError(f"unknown method {method!r}; choose one of: {', '.join(METHOD_SETTINGS)}")
    if preset not in TIERS:
        raise DDKitError(f"unknown preset {preset!r}; choose one of: {', '.join(TIERS)}")
    settings, tier = METHOD_SETTINGS[method], TIERS[preset]
    config = {
        "teachers": copy.deepcopy(tier["teachers"][settings["pool"]]),
        "squeeze": copy.deepcopy(SQUEEZE_PRESETS[preset]),
        "recover": deep_merge(deep_merge(RECOVER_DEFAULTS, settings["recover"]), tier["recover"]),
        "relabel": deep_merge(deep_merge(RELABEL_DEFAULTS, settings["relabel"]), tier["relabel"]),
    }
    config = deep_merge(config, TIER_METHOD_SETTINGS.get((method, preset), {}))
    if preset == "paper":
        config = deep_merge(config, PAPER_PER_DATASET.get((method, dataset), {}))
    return apply_overrides(config, _qualify(overrides), what=f"{method} option")


def _qualify(overrides):
    """Bare option names address the recover stage."""
    if overrides is None:
        return None
    items = override_items(overrides)
    stages = ("teachers", "squeeze", "recover", "relabel")
    return {(k if k.split(".")[0] in stages else f"recover.{k}"): v for k, v in items}


def method_teachers(real, config: dict, seed: int, device, show_progress: bool = True, compiled: bool = False) -> list:
    """Train or load every teacher of ``config["teachers"]`` (cached by dataset, model and recipe;
    ``compiled``: a teacher not cached yet trains through torch.compile)."""
    if not config["teachers"]:
        raise DDKitError("the teacher list is empty; give at least one model")
    return [train_cached(real, model, config["squeeze"], seed=seed + i, device=device, kind="teachers",
                         show_progress=show_progress, desc=f"squeeze {model.get('arch', 'convnet')}",
                         compiled=compiled)
            for i, model in enumerate(config["teachers"])]


def relabel_with(distilled, teachers, config: dict, seed: int, device, show_progress: bool = True):
    """Relabel ``distilled`` with the pool and the method's relabel options (records in ``extras``)."""
    from ddkit.methods.relabel import relabel

    options = config["relabel"]
    # relabel() checks its own arguments; this key only exists here, as the low end of crop_scale.
    check_number("relabel", "crop_scale_min", options["crop_scale_min"], minimum=0, maximum=1)
    result = relabel(distilled, [t.model for t in teachers], epochs=options["epochs"], seed=seed,
                     crop_scale=(options["crop_scale_min"], 1.0), mix=options["mix"],
                     mix_beta=options["mix_beta"], topk=options["topk"],
                     equalize_norm=options["equalize_norm"], batch_size=options["batch_size"],
                     device=device, teacher_info=[t.info() for t in teachers], eval_loss=options["eval_loss"],
                     show_progress=show_progress)
    return result


def recover_set(method: str, real, ipc: int, config: dict, teachers, seed: int, device, show_progress: bool = True,
                checkpoint: dict | None = None):
    """Recover ``ipc`` images per class (no soft labels yet) as a DistilledSet.

    ``checkpoint``: per-batch checkpoints and resume, see :meth:`RecoverEngine.run`."""
    from ddkit.methods.recover import RecoverEngine
    from ddkit.store import DistilledSet

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
            teacher_paths=None, merge_parts=None, checkpoint=None, compiled=False):
        import time

        from ddkit import distributed

        config = resolve_preset(method, real.name, preset, overrides)
        started = time.perf_counter()
        if teacher_paths:
            teachers = [load_teacher(path, real, device) for path in teacher_paths]
            config["teachers"] = [t.model_config for t in teachers]
        else:
            # under torchrun the ranks train missing teachers together (DDP); rank 0 writes the cache
            teachers = method_teachers(real, config, seed, device, show_progress, compiled=compiled)
        squeeze_seconds = time.perf_counter() - started
        result = recover_set(method, real, ipc, config, teachers, seed, device, show_progress, checkpoint)
        if merge_parts is not None:
            merge_parts(result)  # every rank now holds every recovered image
        if relabel and distributed.current().is_main:  # one process labels the merged set
            started = time.perf_counter()
            result = relabel_with(result, teachers, config, seed, device, show_progress)
            result.meta["timings"]["relabel_seconds"] = round(time.perf_counter() - started, 3)
        result.meta["timings"]["squeeze_seconds"] = round(squeeze_seconds, 3)
        return result

    run.__doc__ = (f"Distill with {method}: squeeze (cached) -> recover -> relabel (SPEC section 3); "
                   "``compiled``: teachers not cached yet train through torch.compile.")
    run.splits_work = True
    run.supports_compile = True
    run.supports_checkpoints = True  # the recover step; teachers are cached and relabel is redone
    run.merges_parts = True  # relabel needs every recovered image: the parts are merged before it
    return run


for _name in METHOD_SETTINGS:
    register_method(_name)(distill_statistics(_name))
