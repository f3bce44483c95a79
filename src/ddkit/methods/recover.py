"""The recover engine of the statistics-matching family (SRe2L, CDA, G-VBSM).

Synthetic images start as N(0, 1) noise in normalised space and are optimised with Adam
(betas 0.5, 0.9, cosine lr to 0) so that a frozen teacher classifies their augmented views as the
target class while the statistics they induce inside the teacher match the real data's:

    L = CE(teacher(A(x)), y) + r_bn * L_bn + r_conv * L_conv + densify_weight * L_dense

(the terms registered with :func:`ddkit.methods.terms.recover_term`, summed in that order)

- ``L_bn``: at the input of every BatchNorm2d, batch mean and biased variance against the running
  statistics (Yin et al., "Squeeze, Recover and Relabel", NeurIPS 2023);
- ``L_conv`` (G-VBSM, Shao et al., CVPR 2024): at the input of every Conv2d, channel mean and
  variance plus the patch statistics (:func:`ddkit.losses.patch_statistics`) against targets
  computed once over the augmented real training set and cached next to the teacher; each layer
  dropped with probability ``conv_drop`` per forward;
- the first hooked module in module order (the stem: SRe2L's first BatchNorm, G-VBSM's stem
  Conv2d) counts ``first_multiplier`` times;
- EMA form (G-VBSM, ``ema_alpha``): every statistic's forward value is its EMA, its gradient that
  of the current batch (:func:`ddkit.losses.ema_statistic`); the EMA of each hook lives for the
  whole run of the process, as the published hooks do (``ema_scope=run``; a batch then depends on
  the batches this process recovered before it), or for one batch (``ema_scope=batch``: every
  batch's images are the same whatever process recovers it); a dropped conv hook leaves its EMA
  alone;
- ``L_dense`` (G-VBSM): per-class eigenvalue densification of the augmented batch;
- ``A``: RandomResizedCrop (CDA's curriculum on its lower scale bound) or padded RandomCrop
  (G-VBSM on CIFAR / Tiny-ImageNet), horizontal flip, then a cyclic roll (jitter). After each step
  every channel is clamped to the normalised image of [0, 1].

Teachers are used round-robin, one per iteration, counted over the whole run (a pool of one for
SRe2L and CDA). Feature maps are collected by forward pre-hooks that append to a local list and
are removed when the forward is done: no state is left on the teacher.

Images are processed in batches of ``batch_size`` items (class, slot); ``batch_mode`` says which
items share a batch: ``spread`` (many classes, one image each, SRe2L) or ``class-major`` (few
classes, many images each, G-VBSM). Each batch is optimised for ``iterations`` steps on its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ddkit import distributed, precision
from ddkit import options as rules
from ddkit.augment.crops import CROP_KINDS, JITTER_MODES, augment_batch, cda_min_scale, padding_for
from ddkit.checkpoint import BatchCheckpoints, generator_state, restore_generator
from ddkit.data.streaming import is_streaming
from ddkit.errors import DDKitError
from ddkit.losses.statistics import (
    PATCH_FORMS,
    ConvStatistics,
    bn_statistics,
    bn_statistics_distance,
    conv_statistics,
    conv_statistics_distance,
    densification_loss,
    ema_statistic,
    first_layer_weights,
)
from ddkit.methods.matching import NonFiniteLoss
from ddkit.methods.relabel import auto_flip_prob, padding_fill
from ddkit.methods.terms import RecoverInputs, recover_loss, recover_term, recover_weight_defaults
from ddkit.utils import denormalize, make_generator, normalize, progress

BATCH_MODES = ("spread", "class-major", "class-tenths")
CURRICULA = ("none", "cosine", "linear", "step")
PATCH_POLICIES = ("fit", "strict")
#: G-VBSM's densification as published (``reference``) or ddkit's unit-norm, class-averaged form
DENSIFY_FORMS = ("reference", "unit")
#: how long an EMA statistic lives: the whole run of a process (G-VBSM's hooks) or one batch
EMA_SCOPES = ("run", "batch")


@contextlib.contextmanager
def capture_inputs(model: nn.Module, types: tuple[type, ...]):
    """Collect the input tensor of every ``types`` module during the forwards inside the block.

    Yields a list that fills with ``(module, input [N, C, H, W])`` in call order; the hooks are
    removed on exit, so the model keeps no state from the capture.
    """
    captured: list[tuple[nn.Module, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda mod, args: captured.append((mod, args[0])))
               for m in model.modules() if isinstance(m, types)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def item_order(num_classes: int, ipc: int, mode: str) -> torch.Tensor:
    """The (class, slot) items in batch order as an int64 ``[K * ipc, 2]`` tensor.

    ``spread``: slot-major, so consecutive items are different classes (SRe2L, CDA);
    ``class-major``: all slots of class 0, then class 1, ... (G-VBSM on CIFAR); ``class-tenths``:
    the slots cut into ten groups, and group by group every class's slots of that group (G-VBSM on
    Tiny-ImageNet: at IPC 50 a batch of 100 holds 20 classes of 5 images).
    """
    if mode not in BATCH_MODES:
        raise DDKitError(f"batch_mode={mode!r} is not valid; choose one of: {', '.join(BATCH_MODES)}")
    classes = torch.arange(num_classes).repeat_interleave(ipc)
    slots = torch.arange(ipc).repeat(num_classes)
    items = torch.stack((classes, slots), dim=1)
    if mode == "spread":
        items = items[torch.argsort(slots * num_classes + classes)]
    elif mode == "class-tenths":
        group = slots * 10 // ipc
        items = items[torch.argsort((group * num_classes + classes) * ipc + slots)]
    return items


def patch_cells_for(shape: torch.Size, cells: int, policy: str) -> int | None:
    """The cell count of ``patch_form=cells`` at a conv input of ``shape`` (None: no cell
    statistics there). ``fit``: cells where ``cells`` divides both sides; ``strict``: every layer
    must fit."""
    h, w = int(shape[-2]), int(shape[-1])
    if cells <= 0:
        return None
    if h % cells == 0 and w % cells == 0:
        return cells
    if policy == "strict":
        raise DDKitError(f"patch_cells={cells} does not fit a {h}x{w} feature map of the teacher (it must divide "
                         f"both sides); pick another patch_cells or --set patch_policy=fit to skip such layers")
    return None


def conv_modules(model: nn.Module) -> list[nn.Conv2d]:
    """Every Conv2d of ``model`` in module (registration) order: the order of the conv targets."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def conv_patch(config: dict, shape: torch.Size) -> int | None:
    """The ``patch`` argument of :func:`ddkit.losses.conv_statistics` at a conv input of ``shape``:
    ``patch_size`` pixels for ``patch_form=reference`` (any map size), the cell count where it fits
    for ``patch_form=cells``, None without patch statistics (``patch_size`` / ``patch_cells`` 0)."""
    if config["patch_form"] == "reference":
        return int(config["patch_size"]) or None
    return patch_cells_for(shape, int(config["patch_cells"]), config["patch_policy"])


def hook_distance(x: torch.Tensor, target, ema: dict, key: tuple, alpha: float | None, norm: str = "l2",
                  patch: int | None = None, form: str = "reference", ema_start: str = "statistic") -> torch.Tensor:
    """The distance ``r`` of one hooked layer's input ``x`` ``[N, C, H, W]`` from its target.

    ``target``: ``(running_mean, running_var)`` of a BatchNorm2d, or the :class:`ConvStatistics`
    of a Conv2d (patch statistics of the ``form`` with ``patch`` when the target has them). With
    ``alpha`` each statistic enters through :func:`ddkit.losses.ema_statistic`, its EMA kept in
    ``ema`` under ``(*key, field)`` (updated in place; ``ema_start`` for a new entry). Returns a
    0-dim tensor differentiable with respect to ``x``.
    """
    conv = isinstance(target, ConvStatistics)
    stats = conv_statistics(x, patch if target.patch_mean is not None else None, form) if conv else bn_statistics(x)
    if alpha is not None:
        values = []
        for field, value in enumerate(stats):
            if value is not None:
                name = (*key, field)
                value, ema[name] = ema_statistic(value, ema.get(name), float(alpha), ema_start)
            values.append(value)
        stats = ConvStatistics(*values) if conv else tuple(values)
    if conv:
        return conv_statistics_distance(stats, target, norm)
    return bn_statistics_distance(stats[0], stats[1], target[0], target[1], norm)


class StatisticsHooks:
    """The statistics terms of one teacher: its hooked modules in module order and their weights.

    BatchNorm2d inputs are hooked when ``r_bn > 0``, Conv2d inputs when ``conv_targets`` are given
    (one :class:`ConvStatistics` per :func:`conv_modules` entry). The first hooked module in module
    order counts ``first_multiplier`` times, as the published code weights its first hook: for
    every network of G-VBSM's pool that is the stem Conv2d, for SRe2L the first BatchNorm2d.
    """

    def __init__(self, model: nn.Module, config: dict, conv_targets: list[ConvStatistics] | None = None):
        self.config = config
        bn_on = float(config["r_bn"]) > 0
        self.conv_target = {}
        if conv_targets is not None:
            self.conv_target = dict(zip(conv_modules(model), conv_targets))
        self.modules = [m for m in model.modules()
                        if (bn_on and isinstance(m, nn.BatchNorm2d)) or m in self.conv_target]
        self.weights = first_layer_weights(len(self.modules), float(config["first_multiplier"]))
        self.convs = [m for m in self.modules if isinstance(m, nn.Conv2d)]

    def distances(self, inputs: dict, ema: dict, key: int, keep: dict | None = None) -> list[torch.Tensor | None]:
        """``r`` of every hooked module, in module order (None: not called, or a dropped conv).

        Args:
            inputs: module -> its input of this forward.
            ema: the run's EMA state (updated in place for the hooks that count).
            key: the teacher's index, which keys its EMA entries.
            keep: conv module -> whether it counts this forward (absent: it counts).
        """
        c = self.config
        alpha = c["ema_alpha"]
        start = "zero" if c["legacy_ema_zero_start"] else "statistic"
        out = []
        for index, module in enumerate(self.modules):
            x = inputs.get(module)
            if x is None or (keep is not None and not keep.get(module, True)):
                out.append(None)
                continue
            if isinstance(module, nn.Conv2d):
                target = self.conv_target[module]
                patch = conv_patch(c, x.shape)
            else:
                target, patch = (module.running_mean, module.running_var), None
            out.append(hook_distance(x, target, ema, (key, index), alpha, c["stat_norm"], patch, c["patch_form"],
                                     start))
        return out

    def losses(self, distances: list[torch.Tensor | None], zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_bn, L_conv): the weighted sums of the BatchNorm and Conv2d hooks' ``distances``."""
        bn_loss = conv_loss = zero
        for module, weight, r in zip(self.modules, self.weights, distances):
            if r is None:
                continue
            if isinstance(module, nn.Conv2d):
                conv_loss = conv_loss + weight * r
            else:
                bn_loss = bn_loss + weight * r
        return bn_loss, conv_loss


def conv_target_statistics(model: nn.Module, batches, config: dict) -> list[ConvStatistics]:
    """G-VBSM's real targets at every Conv2d input of ``model`` (module order) from ``batches``.

    Each batch's statistics (:func:`ddkit.losses.conv_statistics`, float64) are weighted by its
    size. ``conv_target_batch > 0`` (the published code, batches of 64): the target is the
    weighted mean of the batch statistics, a mean of batch variances; ``conv_target_batch = 0``:
    the exactly pooled mean and variance of all the images (``E[x^2] - E[x]^2`` from the same
    sums).

    Args:
        model: the teacher (eval mode).
        batches: iterable of normalised, augmented image batches ``[B, C, H, W]``.
        config: recover options (``patch_form``, ``patch_size``, ``patch_cells``, ``patch_policy``,
            ``conv_target_batch``).

    Returns:
        One :class:`ConvStatistics` per Conv2d (float64, on the batches' device).
    """
    convs = conv_modules(model)
    sums, count = None, 0
    with torch.no_grad():
        for batch in batches:
            with capture_inputs(model, (nn.Conv2d,)) as taps:
                model(batch)
            inputs = dict(taps)
            n = int(batch.shape[0])
            stats = [conv_statistics(inputs[m].double(), conv_patch(config, inputs[m].shape), config["patch_form"])
                     for m in convs]
            if sums is None:
                sums = [[[None, None, None] for _ in s] for s in stats]
            for layer, s in zip(sums, stats):
                for slot, (mean, var) in zip(layer, ((s.mean, s.var), (s.patch_mean, s.patch_var))):
                    if mean is None:
                        continue
                    terms = (n * mean, n * var, n * mean.pow(2))
                    slot[:] = terms if slot[0] is None else [a + b for a, b in zip(slot, terms)]
            count += n
    if sums is None:
        raise DDKitError("no real images to compute the conv targets from; give conv_target_images >= 1 or 0 (all)")
    exact = int(config["conv_target_batch"]) == 0
    targets = []
    for layer in sums:
        fields = []
        for mean_sum, var_sum, square_sum in layer:
            if mean_sum is None:
                fields += [None, None]
                continue
            mean = mean_sum / count
            var = (var_sum + square_sum) / count - mean.pow(2) if exact else var_sum / count
            fields += [mean, var.clamp_min(0)]
        targets.append(ConvStatistics(fields[0], fields[1], fields[2], fields[3]))
    return targets


def real_conv_targets(teacher, real, config: dict, device, show_progress: bool = False) -> list[ConvStatistics]:
    """G-VBSM's real targets at every Conv2d input of ``teacher``: cached, computed once.

    Over ``conv_target_images`` random training images (0 = all, as published), each augmented
    once with the recover crop and flip, drawn per image as a data loader does (no roll), in
    batches of ``conv_target_batch`` (:func:`conv_target_statistics`). A padded crop pads the
    image with black, as torchvision pads an image before normalising. Cached as safetensors in
    the teacher's folder, keyed by everything that changes them.

    Returns:
        One :class:`ConvStatistics` per Conv2d in module order (float32, on ``device``).
    """
    size = real.image_shape[1]
    spec = {"images": int(config["conv_target_images"]), "form": config["patch_form"],
            "patch": int(config["patch_size"]) if config["patch_form"] == "reference" else int(config["patch_cells"]),
            "policy": config["patch_policy"], "crop": config["crop"], "scale_min": float(config["crop_scale_min"]),
            "padding": crop_padding(config, size), "flip": _flip_prob(config, real),
            "batch": int(config["conv_target_batch"]), "seed": int(config["conv_target_seed"])}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    cache = teacher.path / f"conv-targets-{key}.safetensors"
    if cache.is_file():
        try:
            tensors = load_file(str(cache))
            count = int(tensors["layers"].item())
            return [ConvStatistics(*(tensors.get(f"{i}.{f}").to(device) if f"{i}.{f}" in tensors else None
                                     for f in ConvStatistics._fields)) for i in range(count)]
        except (OSError, ValueError, KeyError, RuntimeError):
            pass  # damaged cache: compute again
    generator = make_generator(spec["seed"])
    images = real.train.images
    rows = torch.arange(images.shape[0])
    if 0 < spec["images"] < images.shape[0]:
        rows = torch.randperm(images.shape[0], generator=generator)[:spec["images"]]
    step = spec["batch"] or 256
    black = padding_fill(real.mean, real.std).to(device)
    # a streamed split's RandomResizedCrop + flip crop each original file, as a data loader does
    from_files = is_streaming(real) and config["crop"] == "resized"

    def batches():
        for start in progress(range(0, rows.numel(), step), desc="conv targets", enabled=show_progress):
            pick = rows[start:start + step]
            if from_files:
                seeds = torch.randint(0, 2 ** 62, (pick.numel(),), generator=generator).tolist()
                pixels = real.train.decode_many(pick, seeds, (spec["scale_min"], 1.0), spec["flip"])
                yield normalize(pixels.float().div(255.0), real.mean, real.std).to(device)
                continue
            batch = normalize(images[pick].float().div(255.0), real.mean, real.std).to(device)
            yield augment(batch, config, real, generator, 0, 1, per_sample=True, jitter=False, fill=black)[0]

    targets = [ConvStatistics(*(f.float() if f is not None else None for f in t))
               for t in conv_target_statistics(teacher.model, batches(), config)]
    tensors = {"layers": torch.tensor(len(targets))}
    for i, stats in enumerate(targets):
        tensors.update({f"{i}.{name}": f.cpu().contiguous() for name, f in zip(ConvStatistics._fields, stats)
                        if f is not None})
    tmp = cache.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(cache)
    return targets


def _flip_prob(config: dict, real) -> float:
    """``flip: auto`` follows the dataset's DSA strategy, as relabelling does; true/false = 0.5/0."""
    if config["flip"] == "auto":
        return auto_flip_prob(real.name, None)
    return 0.5 if config["flip"] else 0.0


def crop_padding(config: dict, image_size: int) -> int:
    """The padding of ``crop=padded``: ``crop_padding`` pixels, or for ``auto`` G-VBSM's 4 px at
    32 px and 8 px at 64 px (:func:`ddkit.augment.crops.padding_for`)."""
    value = config["crop_padding"]
    return padding_for(image_size) if value == "auto" else int(value)


def augment(x: torch.Tensor, config: dict, real, generator: torch.Generator, iteration: int, total: int,
            per_sample: bool | None = None, jitter: bool = True, fill=0.0):
    """The recover augmentation of ``x`` ``[N, C, H, W]`` (:func:`ddkit.augment.crops.augment_batch`).

    ``crop``: ``resized`` (RandomResizedCrop, lower scale ``crop_scale_min`` raised by CDA's
    curriculum), ``padded`` (RandomCrop with ``crop_padding``, padding value ``fill``; G-VBSM pads
    its normalised synthetic batch with 0) or ``none`` (flip only); one draw for the batch unless
    ``per_sample``. Then a cyclic roll of up to ``jitter`` pixels (``jitter_mode``). The real-data
    targets use the crop and flip only (``jitter=False``): the roll is a recover-time regulariser
    of the synthetic images.

    Returns:
        (augmented x, the crop's lower scale bound).
    """
    low = float(config["crop_scale_min"])
    if config["curriculum"] != "none":
        low = max(low, cda_min_scale(iteration, total, float(config["milestone"]), config["curriculum"]))
    per_sample = bool(config["crop_per_sample"]) if per_sample is None else per_sample
    x = augment_batch(x, generator, config["crop"], _flip_prob(config, real), per_sample, (low, 1.0),
                      crop_padding(config, int(x.shape[-2])), fill, int(config["jitter"]) if jitter else 0,
                      config["jitter_mode"])
    return x, low


# ---- the built-in terms, in summation order: L = CE + r_bn L_bn + r_conv L_conv + densify_weight L_dense ----
@recover_term("ce", weight_option=None, lazy=False, summary="cross-entropy of the teacher on the batch")
def _recover_ce(inputs: RecoverInputs):
    """SRe2L (Yin et al. 2023): the teacher classifies the augmented views as their target class."""
    return F.cross_entropy(inputs.logits, inputs.labels)


def _statistics(inputs: RecoverInputs):
    if "statistics" not in inputs.shared:
        inputs.shared["statistics"] = inputs.engine._statistics_losses(inputs.teacher, inputs.taps)
    return inputs.shared["statistics"]


@recover_term("bn", weight_option="r_bn", default=1.0, lazy=False,
              summary="BatchNorm input statistics against the running statistics")
def _recover_bn(inputs: RecoverInputs):
    """SRe2L (Yin et al. 2023): batch mean and variance at every BatchNorm2d input against its running ones."""
    return _statistics(inputs)[0]


@recover_term("conv", weight_option="r_conv", default=0.0, lazy=False,
              summary="Conv2d input statistics against real targets")
def _recover_conv(inputs: RecoverInputs):
    """G-VBSM (Shao et al. 2024): channel and patch statistics at every Conv2d input against real targets."""
    return _statistics(inputs)[1]


@recover_term("dense", weight_option="densify_weight", default=0.0,
              summary="per-class eigenvalue densification of the batch")
def _recover_dense(inputs: RecoverInputs):
    """G-VBSM (Shao et al. 2024): densification of the augmented batch's per-class features."""
    return inputs.engine._densification(inputs.x, inputs.labels)


#: The recover options and their constraints (the loss terms' weights come from their registry,
#: :func:`ddkit.methods.terms.recover_term`: each a number >= 0).
RECOVER_OPTIONS = {
    **{name: rules.number(integer=True, minimum=1) for name in ("iterations", "batch_size", "log_every", "densify_pool")},
    **{name: rules.number(integer=True, minimum=0)
       for name in ("patch_cells", "patch_size", "conv_target_images", "conv_target_batch", "jitter")},
    "first_multiplier": rules.number(minimum=0),
    "lr": rules.number(above=0),
    "densify_temperature": rules.number(above=0),
    "crop_scale_min": rules.number(minimum=0, maximum=1),
    "conv_drop": rules.number(minimum=0, maximum=1),
    "milestone": rules.number(minimum=0, maximum=1),
    "ema_scope": rules.choice(*EMA_SCOPES),
    "ema_alpha": rules.number(minimum=0, maximum=1, allow=(None,)),
    "crop_padding": rules.number(integer=True, minimum=0, allow=("auto",)),
    "crop_per_sample": rules.flag(),
    "legacy_ema_zero_start": rules.flag(),
    "flip": rules.flag(allow=("auto",)),
    "curriculum": rules.choice(*CURRICULA),
    "patch_policy": rules.choice(*PATCH_POLICIES),
    "batch_mode": rules.choice(*BATCH_MODES),
    "stat_norm": rules.choice("l2", "l2sq", "mse"),
    "crop": rules.choice(*CROP_KINDS),
    "patch_form": rules.choice(*PATCH_FORMS),
    "jitter_mode": rules.choice(*JITTER_MODES),
    "densify_form": rules.choice(*DENSIFY_FORMS),
}


class RecoverEngine:
    """Recover ``ipc`` images per class of ``real`` from a pool of frozen :class:`Teacher` s.

    Args:
        real: the real dataset (shapes, normalisation; training images for conv targets).
        ipc: images per class.
        config: the resolved recover options (see ``ddkit.methods.stats_family.RECOVER_DEFAULTS``).
        teachers: list of :class:`ddkit.methods.squeeze.Teacher`, used round-robin.
    """

    def __init__(self, real, ipc: int, config: dict, teachers: list, seed: int, device, show_progress: bool = True):
        self.real, self.ipc, self.config, self.teachers = real, ipc, config, teachers
        self.seed, self.device, self.show_progress = seed, device, show_progress
        # the teacher passes' precision (ddkit.precision.using); losses and statistics stay in fp32
        self.amp = precision.current(device)
        self._check()
        self.generator = make_generator(seed)
        channels = real.image_shape[0]
        mean = torch.tensor(real.mean, device=device).view(1, channels, 1, 1)
        std = torch.tensor(real.std, device=device).view(1, channels, 1, 1)
        self.low, self.high = (0 - mean) / std, (1 - mean) / std
        if float(config["r_bn"]) > 0 and not any(isinstance(m, nn.BatchNorm2d) for t in teachers
                                                 for m in t.model.modules()):
            raise DDKitError("r_bn > 0 but no teacher has a BatchNorm2d layer; use BatchNorm teachers or --set r_bn=0")
        conv_targets = [None] * len(teachers)
        if float(config["r_conv"]) > 0:
            conv_targets = [real_conv_targets(t, real, config, device, show_progress) for t in teachers]
        self.hooks = [StatisticsHooks(t.model, config, targets) for t, targets in zip(teachers, conv_targets)]
        #: the EMA of every hooked statistic, kept over the whole run (G-VBSM's hooks are never reset)
        self.ema: dict[tuple, torch.Tensor] = {}
        self.log: list[dict] = []
        self._store, self._checkpoint, self._every = None, {}, None

    def _check(self) -> None:
        c = self.config
        if not self.teachers:
            raise DDKitError("the recover step needs at least one teacher")
        weights = {name: rules.number(minimum=0) for name in recover_weight_defaults()}
        rules.check_table(c, {**RECOVER_OPTIONS, **weights}, "recover")
        if c["conv_drop"] == 1:
            raise DDKitError("recover option conv_drop=1 drops every conv term; give a probability below 1")
        if c["curriculum"] != "none" and c["crop"] != "resized":
            raise DDKitError(f"CDA's curriculum={c['curriculum']} moves the scale of a RandomResizedCrop, but crop="
                             f"{c['crop']}; set crop=resized or curriculum=none")
        size = self.real.image_shape[1]
        if c["patch_form"] == "cells" and int(c["patch_cells"]) > size:
            raise DDKitError(f"patch_cells={c['patch_cells']} is larger than the {size}px images; pick a cell count "
                             "that divides the teacher's feature maps")

    def _statistics_losses(self, t_index: int, taps) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_bn, L_conv) of one forward's captured inputs (0 when switched off).

        Each conv hook is dropped with probability ``conv_drop`` (one uniform per conv hook and
        forward from the batch generator); a dropped hook's EMA is not updated."""
        hooks = self.hooks[t_index]
        zero = taps[0][1].sum() * 0.0 if taps else torch.zeros((), device=self.device)
        keep = None
        drop = float(self.config["conv_drop"])
        if drop > 0 and hooks.convs:
            draws = torch.rand(len(hooks.convs), generator=self.generator, device=self.generator.device)
            keep = dict(zip(hooks.convs, (draws >= drop).tolist()))
        return hooks.losses(hooks.distances(dict(taps), self.ema, t_index, keep), zero)

    def _densification(self, x_aug: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """G-VBSM's densification of the augmented batch (``densify_form``: the published form or
        ddkit's unit-norm, class-averaged one)."""
        c = self.config
        unit = c["densify_form"] == "unit"
        return densification_loss(x_aug, labels, int(c["densify_pool"]), float(c["densify_temperature"]),
                                  normalize=unit, reduction="mean" if unit else "sum")

    def _start_batch(self, labels: torch.Tensor, batch_index: int, saved=None):
        """The optimisation state of a batch: fresh (noise from the batch's own generator) or as
        ``saved`` (a :meth:`_batch_state` from a checkpoint, which also restores the run's EMA).
        Returns (x, optimizer, log, next iteration)."""
        c = self.config
        self.generator = make_generator(self.seed * 100003 + batch_index)
        if saved is None:
            if c["ema_scope"] == "batch":
                self.ema = {}
            shape = (labels.numel(), *self.real.image_shape)
            x = torch.randn(shape, generator=self.generator).to(self.device).requires_grad_(True)
            return x, torch.optim.Adam([x], lr=float(c["lr"]), betas=tuple(c["betas"])), [], 0
        tensors, meta = saved
        x = tensors["x"].to(self.device).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=float(c["lr"]), betas=tuple(c["betas"]))
        optimizer.state[x] = {name: tensors[f"adam.{name}"].to(self.device if name != "step" else "cpu").clone()
                              for name in ("step", "exp_avg", "exp_avg_sq")}
        restore_generator(self.generator, tensors["generator"])
        self._restore_ema(tensors)
        return x, optimizer, list(meta["log"]), int(meta["iteration"])

    def _ema_tensors(self) -> dict[str, torch.Tensor]:
        """The run's EMA state as checkpoint tensors (``ema.<json key>``)."""
        return {"ema." + json.dumps(list(key)): value.detach() for key, value in self.ema.items()}

    def _restore_ema(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the run's EMA state from checkpoint tensors (:meth:`_ema_tensors`)."""
        self.ema = {tuple(json.loads(name[len("ema."):])): value.to(self.device)
                    for name, value in tensors.items() if name.startswith("ema.")}

    def _batch_state(self, x, optimizer) -> dict[str, torch.Tensor]:
        """Everything :meth:`_start_batch` needs to continue a batch exactly: the images, Adam's
        moments and step, the batch generator and the EMA statistics."""
        state = optimizer.state[x]
        tensors = {"x": x.detach(), "generator": generator_state(self.generator)}
        tensors.update({f"adam.{name}": state[name] for name in ("step", "exp_avg", "exp_avg_sq")})
        tensors.update(self._ema_tensors())
        return tensors

    def _checkpoint_interval(self, started: float, steps: int) -> int:
        """Iterations between checkpoints: the given count, or about ``seconds`` of work measured
        over this process's first iterations (0 while still measuring)."""
        if self._every is None:
            if self._checkpoint.get("every"):
                self._every = int(self._checkpoint["every"])
            elif steps >= 3:
                per_iteration = (time.perf_counter() - started) / steps
                self._every = max(1, int(float(self._checkpoint.get("seconds", 180)) / per_iteration))
        return self._every or 0

    def _recover_batch(self, labels: torch.Tensor, bar, batch_index: int, saved=None,
                       first_step: int = 0) -> tuple[torch.Tensor, list[dict]]:
        """Optimise one batch (from ``saved`` state if given); returns (normalised x, its loss log).

        ``first_step`` is this process's step count before the batch (fault injection counts in it).
        """
        c = self.config
        iterations = int(c["iterations"])
        x, optimizer, log, start = self._start_batch(labels, batch_index, saved)
        base_lr = float(c["lr"])
        log_every = max(1, int(c["log_every"]))
        bar.update(start)
        started = time.perf_counter()
        for it in range(start, iterations):
            distributed.maybe_inject_fault(first_step + it)
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * base_lr * (1 + math.cos(math.pi * it / iterations))
            # one teacher per iteration, counted over the run as the published loop's counter
            t_index = (batch_index * iterations + it) % len(self.teachers)
            teacher = self.teachers[t_index]
            x_aug, low = augment(x, c, self.real, self.generator, it, iterations)
            with capture_inputs(teacher.model, (nn.BatchNorm2d, nn.Conv2d)) as taps, self.amp.autocast():
                logits = teacher.model(x_aug)
            logits, taps = self.amp.fp32((logits, taps))
            total, terms = recover_loss(RecoverInputs(x_aug, labels, logits, taps, t_index, self), c)
            if not torch.isfinite(total):
                raise NonFiniteLoss(f"the loss became {float(total.detach())} at iteration {it} of batch {batch_index}; "
                                    "lower the learning rate (--set lr=...) or r_bn/r_conv")
            optimizer.zero_grad(set_to_none=True)
            self.amp.backward(total)
            self.amp.step(optimizer)
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, self.high), self.low))
            if it % log_every == 0 or it == iterations - 1:
                values = {name: 0.0 if v is None else float(v.detach()) for name, v in (*terms.items(), ("total", total))}
                values.update({"crop_min": low,
                               "acc": float((logits.argmax(1) == labels).float().mean())})
                log.append({"batch": batch_index, "iteration": it, **{k: round(v, 6) for k, v in values.items()}})
                bar.set_postfix({"ce": f"{values['ce']:.3g}", "bn": f"{values['bn']:.3g}", "acc": f"{values['acc']:.2f}"})
            bar.update(1)
            if self._store is not None and it + 1 < iterations:
                every = self._checkpoint_interval(started, it + 1 - start)
                if every and (it + 1) % every == 0:
                    self._store.save_running(batch_index, self._batch_state(x, optimizer),
                                             {"iteration": it + 1, "log": log})
        return x.detach(), log

    def run(self, checkpoint: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Recover every batch (this rank's batches under torchrun).

        Batch ``b`` draws from its own generator (seeded from the run seed and ``b``), so its images
        do not depend on which process recovers it; ranks take the batches round-robin.

        Args:
            checkpoint: ``{"dir", "every" (iterations; 0 = about every ``seconds``), "seconds",
                "resume", "run"}`` or None. With it, every finished batch and, every ``every``
                iterations, the batch in progress are stored (:class:`ddkit.checkpoint.BatchCheckpoints`);
                with ``resume`` a finished batch is loaded and a batch in progress continues exactly
                where it stopped, so the result equals an uninterrupted run's.

        Returns:
            (pixel images float [K*ipc, C, H, W] on the CPU in class order, labels int64 [K*ipc],
            record with timings, the loss log and ``rows``: int64 indices of the images recovered here).
        """
        world = distributed.current()
        k = self.real.num_classes
        items = item_order(k, self.ipc, self.config["batch_mode"])
        size = int(self.config["batch_size"])
        batches = [items[s:s + size] for s in range(0, items.shape[0], size)]
        mine = [b for b in range(len(batches)) if b % world.size == world.rank]
        resume = bool(checkpoint and checkpoint.get("resume"))
        self._checkpoint, self._every = checkpoint or {}, None
        self._store = BatchCheckpoints(checkpoint["dir"]) if checkpoint else None
        if self._store is not None and not resume:
            if world.is_main:  # a new run: nothing left from an earlier one may be taken over later
                for kind in ("done", "running"):
                    shutil.rmtree(self._store.root / kind, ignore_errors=True)
                self._store.mark(checkpoint["run"])
            distributed.barrier()
        images = torch.zeros((k * self.ipc, *self.real.image_shape))
        rows = []
        iterations = int(self.config["iterations"])
        started = time.perf_counter()
        total_steps, computed_steps = len(mine) * iterations, 0
        with progress(total=total_steps, desc="recover", enabled=self.show_progress) as bar:
            for position, b in enumerate(mine):
                batch = batches[b]
                index = batch[:, 0] * self.ipc + batch[:, 1]
                rows.append(index)
                finished = self._store.done(b) if resume else None
                if finished is not None:
                    images[index] = finished[0]["pixels"]
                    self._restore_ema(finished[0])  # the EMA as this process left it after that batch
                    self.log.extend(finished[1]["log"])
                    bar.update(iterations)
                    continue
                saved = self._store.running(b) if resume else None
                x, log = self._recover_batch(batch[:, 0].to(self.device), bar, b, saved, position * iterations)
                computed_steps += iterations - (int(saved[1]["iteration"]) if saved else 0)
                pixels = denormalize(x, self.real.mean, self.real.std).clamp(0, 1).cpu()
                images[index] = pixels
                self.log.extend(log)
                if self._store is not None:
                    self._store.save_done(b, {"pixels": pixels, **self._ema_tensors()}, {"log": log})
        seconds = time.perf_counter() - started
        labels = torch.arange(k).repeat_interleave(self.ipc)
        record = {"recover_seconds": round(seconds, 3),
                  "seconds_per_iteration": round(seconds / max(1, computed_steps), 4),
                  "loss_log": self.log, "rows": torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)}
        return images, labels, record
