"""Squeeze: train a teacher on the real data once and cache it by (dataset, architecture, recipe).

The statistics-matching family (SRe2L, CDA, G-VBSM) recovers images from a frozen teacher's
BatchNorm / Conv2d statistics and relabels them with its logits; IID's class centralization uses
the same kind of pretrained network. Every trained network lives in
``$DDKIT_DATA/<kind>/<dataset>/<name>/`` as ``model.safetensors`` (weights only, so loading never
executes code) plus ``manifest.json`` (dataset, shape, classes, architecture, recipe, test
accuracy). The folder name holds a hash of everything that determines the weights, so a changed
recipe trains and caches a new network and an unchanged one is loaded in well under a second.

A recipe that names a ``schedule`` is one of the papers' teacher recipes (the statistics
family's presets in :mod:`ddkit.methods.stats_family`) and trains with :func:`train_teacher`:
SGD with momentum, a constant, cosine or warm-up + cosine learning rate, and the papers' data
augmentation (padded RandomCrop or RandomResizedCrop, and a flip, drawn per image). A recipe
without one (``ddkit squeeze``'s generic presets, :data:`SQUEEZE_PRESETS`; IID's feature
extractors) trains with the generic classifier schedule of
:func:`ddkit.models.training.train_classifier` (lr x ``decay_factor`` at ``decay_at`` of the
epochs, no augmentation). Either may train on a random subset of the training split.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ddkit import distributed, precision
from ddkit.augment.crops import CROP_KINDS, augment_batch, padding_for
from ddkit.checkpoint import save_tensors_atomic
from ddkit.data import data_root
from ddkit.data.streaming import StreamedInputs, is_streaming, normalized_split
from ddkit.errors import DDKitError
from ddkit.methods.relabel import auto_flip_prob, padding_fill
from ddkit.models import build, default_depth
from ddkit.models.training import (
    RunCheckpoint,
    check_compile_available,
    check_training_options,
    test_accuracy,
    train_classifier,
)
from ddkit.optim import check_schedule_options, train_scheduled
from ddkit.tiers import check_tier, check_tier_table
from ddkit.utils import (
    apply_overrides,
    check_flag,
    check_number,
    check_option,
    holding_lock,
    make_generator,
    normalize,
    write_json_atomic,
)

#: The two files of a teacher cache entry: its weights and what trained them.
TEACHER_WEIGHTS, TEACHER_MANIFEST = "model.safetensors", "manifest.json"
#: Teacher training recipes per tier (every key overridable).
SQUEEZE_PRESETS: dict[str, dict] = check_tier_table({
    "paper": {"epochs": 30, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128,
              "decay_at": 0.5, "decay_factor": 0.1, "train_subset": 0, "sync_bn": False},
    "quick": {"epochs": 2, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 128,
              "decay_at": 0.5, "decay_factor": 0.1, "train_subset": 20000, "sync_bn": False},
    "smoke": {"epochs": 6, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 64,
              "decay_at": 0.5, "decay_factor": 0.1, "train_subset": 1500, "sync_bn": False},
}, "SQUEEZE_PRESETS")
#: Recipe keys that change the trained weights (and so the cache key); the keys a recipe lacks are
#: left out of the key, so a generic recipe keeps the cache entries it had before the papers' ones.
RECIPE_KEYS = ("epochs", "lr", "momentum", "weight_decay", "batch_size", "decay_at", "decay_factor", "train_subset",
               "schedule", "warmup_epochs", "warmup_start", "crop", "crop_padding", "crop_scale_min", "flip")


def build_net(model_config: dict, real, seed: int, device) -> torch.nn.Module:
    """A network for ``real`` from ``{"arch": ..., **options}``, initialised from ``seed``.

    ``depth: None`` of a ConvNet means the default depth for the image size (3 up to 32 px, 4 at 64 px); other None
    options are dropped (the factory's default applies).
    """
    options = dict(model_config)
    arch = options.pop("arch", "convnet")
    options.pop("pretrained", None)  # where a preset's pretrained teacher comes from, not a model option
    options.pop("source", None)
    channels, size, _ = real.image_shape
    if arch == "convnet" and options.get("depth") is None:
        options["depth"] = default_depth(size)
    options = {k: v for k, v in options.items() if v is not None}
    return build(arch, channels, real.num_classes, size, seed, device, **options)


def frozen(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` with every parameter's ``requires_grad`` off (its gradients are never needed)."""
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net


@dataclass
class Teacher:
    """A trained, frozen network in eval mode (BatchNorm uses its running statistics).

    Attributes:
        model: maps normalised images ``[B, C, H, W]`` to logits ``[B, K]``.
        model_config: ``{"arch": ..., **options}`` it was built from.
        recipe: the training recipe (:data:`RECIPE_KEYS`) plus dataset facts and seed.
        test_accuracy: top-1 on the real test split, percent.
        path: its cache folder.
    """

    model: torch.nn.Module
    model_config: dict
    recipe: dict
    test_accuracy: float
    path: Path

    @property
    def name(self) -> str:
        """``arch`` plus its non-default options, e.g. ``convnet(norm=batch,width=32)``."""
        options = {k: v for k, v in self.model_config.items() if k != "arch" and v is not None}
        inner = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
        return f"{self.model_config.get('arch', 'convnet')}({inner})" if inner else self.model_config.get("arch", "convnet")

    def info(self) -> dict:
        """JSON-able identity recorded in manifests of sets made with this teacher."""
        accuracy = None if self.test_accuracy != self.test_accuracy else round(self.test_accuracy, 3)  # NaN: not measured
        return {"name": self.name, "model": self.model_config, "test_accuracy": accuracy, "key": self.path.name}


def recipe_for(real, model_config: dict, schedule: dict, seed: int) -> dict:
    """Everything that determines a trained network's weights (hashed into its cache key)."""
    recipe = {"dataset": real.name, "image_shape": list(real.image_shape), "num_classes": real.num_classes,
              "model": dict(model_config), "seed": int(seed), **{k: schedule[k] for k in RECIPE_KEYS if k in schedule}}
    if schedule.get("sync_bn"):  # whole-batch BatchNorm under torchrun trains other weights; off keeps old keys
        recipe["sync_bn"] = True
    return recipe


def cache_folder(kind: str, real, recipe: dict) -> Path:
    """``$DDKIT_DATA/<kind>/<dataset>/<arch>-<hash of recipe>``."""
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    return data_root() / kind / real.name / f"{recipe['model'].get('arch', 'convnet')}-{key}"


def _check_teacher_manifest(manifest: dict, real, where: Path) -> None:
    if manifest.get("dataset") != real.name or int(manifest.get("num_classes", -1)) != real.num_classes or list(
            manifest.get("image_shape", [])) != list(real.image_shape):
        raise DDKitError(
            f"the teacher in {where} was trained for {manifest.get('dataset')!r} "
            f"({manifest.get('num_classes')} classes, shape {manifest.get('image_shape')}) but this run uses "
            f"{real.name!r} ({real.num_classes} classes, shape {list(real.image_shape)}); "
            f"squeeze a teacher for {real.name} (ddkit squeeze --dataset {real.name})"
        )


def load_teacher(path: str | Path, real, device="cpu") -> Teacher:
    """Load a cached or user-given teacher folder and check that it fits ``real``.

    Raises:
        DDKitError: not a teacher folder, damaged weights, or trained for another dataset,
            class count or image shape.
    """
    path = Path(path)
    manifest_path, weights = path / TEACHER_MANIFEST, path / TEACHER_WEIGHTS
    if not manifest_path.is_file() or not weights.is_file():
        raise DDKitError(f"{path} is not a teacher folder (needs manifest.json and model.safetensors); "
                         "make one with ddkit squeeze")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise DDKitError(f"{manifest_path} is not valid JSON; delete {path} and squeeze again") from None
    _check_teacher_manifest(manifest, real, path)
    net = build_net(manifest["model"], real, seed=0, device="cpu")
    try:
        net.load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError, ValueError) as exc:
        raise DDKitError(f"{weights} does not fit {manifest['model']} ({str(exc).splitlines()[0]}); "
                         f"delete {path} and squeeze again") from None
    return Teacher(frozen(net.to(device)).eval(), dict(manifest["model"]), manifest.get("recipe", {}),
                   float(manifest.get("test_accuracy", float("nan"))), path)


def train_cached(real, model_config: dict, schedule: dict, seed: int, device, kind: str = "teachers",
                 show_progress: bool = False, desc: str = "squeeze", compiled: bool = False,
                 options_name: str = "squeeze") -> Teacher:
    """Train ``model_config`` on ``real``'s training split with ``schedule`` (or load it from cache).

    Args:
        real: a :class:`ddkit.data.RealDataset`.
        model_config: ``{"arch": ..., **options}``.
        schedule: the :data:`RECIPE_KEYS` (epochs, lr, ...; ``train_subset`` 0 = all images).
        seed: initialisation, subset and batch-order seed.
        kind: cache sub-folder ("teachers", or "pretrained" for IID's feature extractors).
        compiled: train through ``torch.compile`` (an execution detail: not part of the cache key;
            the manifest says ``"compiled": true``).
        options_name: what a bad ``schedule`` value is called in the error ("squeeze", "cc").

    Returns:
        A frozen :class:`Teacher` in eval mode on ``device``.
    """
    check_training_options(schedule, options_name)
    check_number(options_name, "train_subset", schedule.get("train_subset", 0), integer=True, minimum=0)
    if "schedule" in schedule:
        check_teacher_recipe(schedule, options_name)
    recipe = recipe_for(real, model_config, schedule, seed)
    folder = cache_folder(kind, real, recipe)
    teacher = _load_cached(folder, real, device)
    if teacher is not None:
        return teacher
    with _training_lock(folder):
        # another process may have trained it while this one waited for the lock; cached networks are
        # shared by every run, so they train in fp32 whatever the run's --precision
        with precision.using("fp32"):
            return _load_cached(folder, real, device) or _train_into_cache(
                folder, real, model_config, schedule, recipe, seed, device, kind, show_progress, desc, compiled)


def _load_cached(folder: Path, real, device) -> Teacher | None:
    """The cache entry ``folder`` loaded, or None where it is missing, damaged or stale (train again)."""
    if (folder / TEACHER_WEIGHTS).is_file() and (folder / TEACHER_MANIFEST).is_file():
        try:
            return load_teacher(folder, real, device)
        except DDKitError:
            pass
    return None


@contextlib.contextmanager
def _training_lock(folder: Path):
    """Held while this process trains the cache entry ``folder``: another process that asks for the
    same network (two bench processes on one grid) waits, then loads what this one saved, instead
    of training it a second time. Not under torchrun, whose ranks train the network together."""
    if distributed.current().distributed:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with holding_lock(folder / ".training.lock"):
        yield


def _train_into_cache(folder: Path, real, model_config: dict, schedule: dict, recipe: dict, seed: int, device,
                      kind: str, show_progress: bool, desc: str, compiled: bool) -> Teacher:
    """Train the network of :func:`train_cached` and save it to its cache entry ``folder``."""
    started = time.perf_counter()
    net = build_net(model_config, real, seed=seed, device=device)
    generator = make_generator(seed)
    images, labels = real.train.images, real.train.labels
    subset = int(schedule.get("train_subset", 0) or 0)
    pick = None
    if 0 < subset < labels.numel():
        pick = torch.randperm(labels.numel(), generator=generator)[:subset]
        labels = labels[pick]
    # A papers' recipe streams (decoded and augmented per batch inside train_teacher); the generic
    # recipe trains on a subset decoded once (IID's feature extractors), never on a whole split.
    streamed = is_streaming(real) and "schedule" in schedule
    if is_streaming(real) and not streamed and subset <= 0:
        raise DDKitError(f"{real.name} streams from disk: train its teachers with a papers' recipe (ddkit distill "
                         f"sre2l/cda/gvbsm) or on a subset (--set train_subset=N), or give a pretrained one "
                         f"(--teacher torchvision:resnet18 or ARCH:FILE)")
    if streamed:
        inputs = StreamedInputs(real, pick, seed, device)
    else:  # in memory, or a streaming dataset's subset of at most train_subset images decoded once
        if is_streaming(real):
            images = images[pick if pick is not None else torch.arange(labels.numel())]
        elif pick is not None:
            images = images[pick]
        inputs = normalize(images.float().div(255.0), real.mean, real.std).to(device)
    # A teacher can train for many minutes on a CPU: epoch checkpoints in its cache folder (rank 0 writes).
    checkpoint = RunCheckpoint(folder / "training.safetensors", recipe)
    if "schedule" in schedule:
        train_teacher(net, inputs, labels.to(device), schedule, generator, real, show_progress=show_progress, desc=desc,
                      checkpoint=checkpoint, compiled=compiled)
    else:
        config = {"reset_momentum": True, "sync_bn": bool(schedule.get("sync_bn", False)),
                  **{k: schedule[k] for k in RECIPE_KEYS if k != "train_subset" and k in schedule}}
        train_classifier(net, inputs, labels.to(device), config, generator, dsa=None, show_progress=show_progress,
                         desc=desc, checkpoint=checkpoint, compiled=compiled)
    started -= checkpoint.seconds_before
    accuracy = 100.0 * test_accuracy(net, normalized_split(real, "test", device), real.test.labels.to(device))
    if not distributed.current().is_main:  # under torchrun (DDP training), rank 0 writes the cache
        distributed.barrier()
        # ...and every rank uses what it wrote: BatchNorm running statistics are per process under
        # DDP, so this rank's own copy would recover and relabel with other statistics
        return load_teacher(folder, real, device)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(folder / TEACHER_WEIGHTS, net.state_dict())
    write_json_atomic(folder / TEACHER_MANIFEST, {
        "kind": kind, "dataset": real.name, "num_classes": real.num_classes, "image_shape": list(real.image_shape),
        "model": dict(model_config), "recipe": recipe, "test_accuracy": round(accuracy, 4),
        "train_seconds": round(time.perf_counter() - started, 2), **({"compiled": True} if compiled else {})})
    checkpoint.remove()
    distributed.barrier()
    return Teacher(frozen(net).eval(), dict(model_config), recipe, accuracy, folder)


def check_teacher_recipe(recipe: dict, what: str = "squeeze") -> None:
    """Refuse, with one line, a papers'-style teacher recipe no loop could use."""
    check_schedule_options(recipe, what)
    check_option(what, "crop", recipe.get("crop", "none"), CROP_KINDS)
    check_number(what, "crop_scale_min", recipe.get("crop_scale_min", 0.08), above=0, maximum=1)
    if recipe.get("crop_padding", "auto") != "auto":
        check_number(what, "crop_padding", recipe["crop_padding"], integer=True, minimum=0)
    if recipe.get("flip", "auto") != "auto":
        check_flag(what, "flip", recipe["flip"])


def train_teacher(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: dict,
                  generator: torch.Generator, real, show_progress: bool = False, desc: str = "squeeze",
                  checkpoint: RunCheckpoint | None = None, compiled: bool = False) -> list[float]:
    """Train a teacher with cross-entropy under one of the papers' recipes.

    SGD (``lr``, ``momentum``, ``weight_decay`` on every parameter) with the learning rate of
    :func:`ddkit.optim.lr_factor` (``schedule`` constant, cosine per step or per epoch, after
    ``warmup_epochs`` of linear warm-up), batches of ``batch_size`` in a random order per epoch,
    each image augmented on its own as a data loader would: ``crop`` = ``padded`` (RandomCrop with
    ``crop_padding``, padded with black as torchvision pads an image before normalising),
    ``resized`` (RandomResizedCrop from ``crop_scale_min``) or ``none``, then a flip (``flip``:
    ``auto`` follows the dataset, as relabelling does).

    Args:
        images: float ``[N, C, H, W]``, normalised, on the model's device; or a streaming split's
            :class:`ddkit.data.streaming.StreamedInputs` (each batch decoded from disk: ``crop``
            ``resized`` crops the original file, other crops apply to the decoded image).
        labels: int64 ``[N]`` on the same device.
        generator: CPU generator of the batch order and every augmentation draw.
        real: the dataset (name, normalisation).
        checkpoint: epoch checkpoints (:class:`ddkit.models.training.RunCheckpoint`), or None.

    Returns:
        The mean training loss of each epoch (this rank's share under torchrun).
    """
    flip = recipe.get("flip", "auto")
    flip_prob = auto_flip_prob(real.name, None) if flip == "auto" else (0.5 if flip else 0.0)
    if isinstance(images, StreamedInputs):  # decoded and augmented per batch from disk
        fill = padding_fill(real.mean, real.std).to(images.device)

        def streamed_loss(module, epoch, index, mine):
            share = index[mine]
            batch = images.batch(share, epoch, recipe, generator, flip_prob, fill)
            return F.cross_entropy(module(batch), labels[share.to(labels.device)])

        return train_scheduled(model, images.rows.numel(), recipe, generator, streamed_loss, show_progress, desc,
                               checkpoint, compiled)
    size = int(images.shape[-1])
    padding = padding_for(size) if recipe.get("crop_padding", "auto") == "auto" else int(recipe["crop_padding"])
    black = padding_fill(real.mean, real.std).to(images.device)
    scale = (float(recipe.get("crop_scale_min", 0.08)), 1.0)

    def batch_loss(module, epoch, index, mine):
        # the whole batch is augmented (every process draws the same), then this process's share
        index = index.to(images.device)
        batch = augment_batch(images[index], generator, recipe.get("crop", "none"), flip_prob, True, scale, padding,
                              black)
        return F.cross_entropy(module(batch[mine]), labels[index[mine]])

    return train_scheduled(model, images.shape[0], recipe, generator, batch_loss, show_progress, desc, checkpoint,
                           compiled)


def squeeze_config(preset: str, overrides=None) -> dict:
    """The teacher recipe of ``preset`` with ``overrides`` (dict or ``key=value`` strings)."""
    check_tier(preset, "squeeze preset")
    return apply_overrides(SQUEEZE_PRESETS[preset], overrides, what="squeeze option")


def squeeze(real, model_config: dict, preset: str = "quick", overrides=None, seed: int = 0, device="cpu",
            show_progress: bool = True, compiled: bool = False) -> Teacher:
    """Train (or load the cached) teacher ``model_config`` for ``real`` with the ``preset`` recipe
    (``compiled``: through ``torch.compile``, see :func:`train_cached`)."""
    schedule = squeeze_config(preset, overrides)
    if compiled:
        check_compile_available(device)
    return train_cached(real, model_config, schedule, seed, device, kind="teachers", show_progress=show_progress,
                        desc=f"squeeze {model_config.get('arch', 'convnet')}", compiled=compiled)
