"""The recover engine of the statistics-matching family (SRe2L, CDA, G-VBSM).

Synthetic images start as N(0, 1) noise in normalised space and are optimised with Adam
(betas 0.5, 0.9, cosine lr to 0) so that a frozen teacher classifies their augmented views as the
target class while the statistics they induce inside the teacher match the real data's:

    L = CE(teacher(A(x)), y) + r_bn * L_bn + r_conv * L_conv + w_dense * L_dense

- ``L_bn``: at the input of every BatchNorm2d, batch mean and biased variance against the running
  statistics (first layer x ``first_bn_multiplier``), :func:`ddkit.losses.bn_matching_loss`;
- ``L_conv`` (G-VBSM): at the input of every Conv2d, channel and per-cell patch mean / variance
  against targets computed once over the augmented real training set and cached next to the
  teacher; each layer dropped with probability ``conv_drop``;
- EMA form (G-VBSM, ``ema_alpha``): every statistic's forward value is its EMA over iterations,
  its gradient that of the current batch (:func:`ddkit.losses.ema_statistic`);
- ``L_dense`` (G-VBSM): per-class eigenvalue densification of the batch's images;
- ``A``: RandomResizedCrop (one box for the batch or one per sample; CDA's curriculum on its lower
  scale bound) + horizontal flip, then a cyclic roll (jitter). After each step every channel is
  clamped to the normalised image of [0, 1].

Teachers are used round-robin, one per iteration (a pool of one for SRe2L and CDA). Feature
maps are collected by forward pre-hooks that append to a local list and are removed when the
forward is done: no state is left on the teacher.

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

from ddkit import distributed
from ddkit.augment.crops import apply_crops, apply_flips, apply_jitter, cda_min_scale, sample_crops, sample_flips, sample_jitter
from ddkit.checkpoint import BatchCheckpoints, generator_state, restore_generator
from ddkit.errors import DDKitError
from ddkit.losses.statistics import (
    ConvStatistics,
    bn_matching_loss,
    bn_statistics,
    conv_statistics_loss,
    densification_loss,
    ema_statistic,
    patch_statistics,
)
from ddkit.methods.matching import NonFiniteLoss
from ddkit.methods.relabel import auto_flip_prob
from ddkit.utils import check_flag, check_number, check_option, denormalize, make_generator, normalize, progress

BATCH_MODES = ("spread", "class-major")
CURRICULA = ("none", "cosine", "linear", "step")
PATCH_POLICIES = ("fit", "strict")


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

    ``spread``: slot-major, so consecutive items are different classes; ``class-major``: all slots
    of class 0, then class 1, ...
    """
    if mode not in BATCH_MODES:
        raise DDKitError(f"batch_mode={mode!r} is not valid; choose one of: {', '.join(BATCH_MODES)}")
    classes = torch.arange(num_classes).repeat_interleave(ipc)
    slots = torch.arange(ipc).repeat(num_classes)
    items = torch.stack((classes, slots), dim=1)
    if mode == "spread":
        items = items[torch.argsort(slots * num_classes + classes)]
    return items


def patch_cells_for(shape: torch.Size, cells: int, policy: str) -> int | None:
    """The patch cell count used at a conv input of ``shape`` (None: no patch statistics there).

    ``fit``: patch statistics where ``cells`` divides both sides; ``strict``: every layer must fit.
    """
    h, w = int(shape[-2]), int(shape[-1])
    if cells <= 0:
        return None
    if h % cells == 0 and w % cells == 0:
        return cells
    if policy == "strict":
        raise DDKitError(f"patch_cells={cells} does not fit a {h}x{w} feature map of the teacher (it must divide "
                         f"both sides); pick another patch_cells or --set patch_policy=fit to skip such layers")
    return None


def _cell_sums(x: torch.Tensor, cells: int | None):
    """Per-channel and per-cell sums of x and x^2 in float64 (for exact pooled statistics)."""
    x = x.detach().double()
    n, c, h, w = x.shape
    sums = [x.sum(dim=(0, 2, 3)), x.pow(2).sum(dim=(0, 2, 3))]
    if cells:
        v = x.reshape(n, c, cells, h // cells, cells, w // cells)
        sums += [v.sum(dim=(0, 3, 5)), v.pow(2).sum(dim=(0, 3, 5))]
    return sums, n * h * w


def real_conv_targets(teacher, real, config: dict, device, show_progress: bool = False) -> list[ConvStatistics]:
    """G-VBSM's real targets at every Conv2d input of ``teacher``: cached, computed once.

    Over ``conv_target_images`` random training images (0 = all), each augmented once with the
    recover crop + flip (lowest scale ``crop_scale_min``), the exact mean and biased variance per
    channel (and per cell where :func:`patch_cells_for` allows) pooled over every image and pixel.
    Cached as safetensors in the teacher's folder, keyed by everything that changes them.

    Returns:
        One :class:`ConvStatistics` per Conv2d in forward order (float32, on ``device``).
    """
    spec = {"images": int(config["conv_target_images"]), "cells": int(config["patch_cells"]),
            "policy": config["patch_policy"], "scale_min": float(config["crop_scale_min"]),
            "flip": _flip_prob(config, real), "crop": bool(config["crop"]), "seed": int(config["conv_target_seed"])}
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
    if 0 < spec["images"] < images.shape[0]:
        images = images[torch.randperm(images.shape[0], generator=generator)[:spec["images"]]]
    totals, counts, cells_of = None, None, None
    bar = progress(range(0, images.shape[0], 256), desc="conv targets", enabled=show_progress)
    with torch.no_grad():
        for start in bar:
            batch = normalize(images[start:start + 256].float().div(255.0), real.mean, real.std).to(device)
            batch = _augment(batch, config, real, generator, 0, 1, per_sample=True, jitter=False)[0]
            with capture_inputs(teacher.model, (nn.Conv2d,)) as taps:
                teacher.model(batch)
            if cells_of is None:
                cells_of = [patch_cells_for(x.shape, spec["cells"], spec["policy"]) for _, x in taps]
                totals = [None] * len(taps)
                counts = [0] * len(taps)
            for i, (_, x) in enumerate(taps):
                sums, count = _cell_sums(x, cells_of[i])
                totals[i] = sums if totals[i] is None else [a + b for a, b in zip(totals[i], sums)]
                counts[i] += count
    targets, tensors = [], {"layers": torch.tensor(len(totals))}
    for i, (sums, count) in enumerate(zip(totals, counts)):
        mean = sums[0] / count
        var = (sums[1] / count - mean.pow(2)).clamp_min(0)
        fields = [mean, var]
        if cells_of[i]:
            per_cell = count / cells_of[i] ** 2
            p_mean = sums[2] / per_cell
            fields += [p_mean, (sums[3] / per_cell - p_mean.pow(2)).clamp_min(0)]
        stats = ConvStatistics(*(f.float() for f in fields))
        targets.append(ConvStatistics(*(f.to(device) if f is not None else None for f in stats)))
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


def _augment(x: torch.Tensor, config: dict, real, generator: torch.Generator, iteration: int, total: int,
             per_sample: bool | None = None, jitter: bool = True):
    """RandomResizedCrop (+ CDA lower bound) + flip, then the jitter roll. Returns (x_aug, min_scale).

    The real-data targets use the crop and flip only (``jitter=False``): the roll is a recover-time
    regulariser of the synthetic images, not part of the data's distribution."""
    flip_prob = _flip_prob(config, real)
    per_sample = bool(config["crop_per_sample"]) if per_sample is None else per_sample
    low = float(config["crop_scale_min"])
    if config["curriculum"] != "none":
        low = max(low, cda_min_scale(iteration, total, float(config["milestone"]), config["curriculum"]))
    if config["crop"]:
        params = sample_crops(x.shape[0], tuple(x.shape[-2:]), generator, scale=(low, 1.0),
                              per_sample=per_sample, flip_prob=flip_prob)
        x = apply_crops(x, params, tuple(x.shape[-2:]))
    elif flip_prob > 0:
        x = apply_flips(x, sample_flips(x.shape[0] if per_sample else 1, generator, flip_prob).to(x.device))
    if jitter and int(config["jitter"]) > 0:
        x = apply_jitter(x, sample_jitter(int(config["jitter"]), generator))
    return x, low


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
        self._check()
        self.generator = make_generator(seed)
        channels = real.image_shape[0]
        mean = torch.tensor(real.mean, device=device).view(1, channels, 1, 1)
        std = torch.tensor(real.std, device=device).view(1, channels, 1, 1)
        self.low, self.high = (0 - mean) / std, (1 - mean) / std
        self.bn_layers = [[m for m in t.model.modules() if isinstance(m, nn.BatchNorm2d)] for t in teachers]
        needs_bn = float(config["r_bn"]) > 0
        if needs_bn and not any(self.bn_layers):
            raise DDKitError("r_bn > 0 but no teacher has a BatchNorm2d layer; use BatchNorm teachers or --set r_bn=0")
        self.conv_targets = None
        if float(config["r_conv"]) > 0:
            self.conv_targets = [real_conv_targets(t, real, config, device, show_progress) for t in teachers]
        self.log: list[dict] = []
        self._store, self._checkpoint, self._every = None, {}, None

    def _check(self) -> None:
        c = self.config
        if not self.teachers:
            raise DDKitError("the recover step needs at least one teacher")
        for name in ("iterations", "batch_size", "log_every", "densify_pool"):
            check_number("recover", name, c[name], integer=True, minimum=1)
        for name in ("patch_cells", "conv_target_images", "jitter"):
            check_number("recover", name, c[name], integer=True, minimum=0)
        for name in ("r_bn", "r_conv", "densify_weight", "first_bn_multiplier"):
            check_number("recover", name, c[name], minimum=0)
        check_number("recover", "lr", c["lr"], above=0)
        check_number("recover", "densify_temperature", c["densify_temperature"], above=0)
        for name in ("crop_scale_min", "conv_drop"):
            check_number("recover", name, c[name], minimum=0, maximum=1)
        check_number("recover", "milestone", c["milestone"], minimum=0, maximum=1)
        for name in ("crop", "crop_per_sample", "densify_normalize"):
            check_flag("recover", name, c[name])
        for name, choices in (("curriculum", CURRICULA), ("patch_policy", PATCH_POLICIES), ("batch_mode", BATCH_MODES),
                              ("stat_norm", ("l2", "l2sq", "mse"))):
            check_option("recover", name, c[name], choices)
        size = self.real.image_shape[1]
        if int(c["patch_cells"]) > size:
            raise DDKitError(f"patch_cells={c['patch_cells']} is larger than the {size}px images; pick a cell count "
                             "that divides the teacher's feature maps")

    def _statistics_losses(self, t_index: int, taps, ema: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_bn, L_conv) of one forward's captured inputs (0 when switched off)."""
        c = self.config
        alpha = c["ema_alpha"]
        zero = taps[0][1].sum() * 0.0 if taps else torch.zeros((), device=self.device)

        def maybe_ema(key, value):
            if alpha is None:
                return value
            out, ema[key] = ema_statistic(value, ema.get(key), float(alpha))
            return out

        bn_loss = conv_loss = zero
        if float(c["r_bn"]) > 0 and self.bn_layers[t_index]:
            stats, targets = [], []
            bn_inputs = [x for m, x in taps if isinstance(m, nn.BatchNorm2d)]
            for i, (layer, x) in enumerate(zip(self.bn_layers[t_index], bn_inputs)):
                mean, var = bn_statistics(x)
                stats.append((maybe_ema(("bn", t_index, i, 0), mean), maybe_ema(("bn", t_index, i, 1), var)))
                targets.append((layer.running_mean, layer.running_var))
            bn_loss = bn_matching_loss(stats, targets, float(c["first_bn_multiplier"]), c["stat_norm"])
        if self.conv_targets is not None:
            conv_inputs = [x for m, x in taps if isinstance(m, nn.Conv2d)]
            targets = self.conv_targets[t_index]
            stats = []
            for i, (x, target) in enumerate(zip(conv_inputs, targets)):
                cells = target.patch_mean.shape[-1] if target.patch_mean is not None else None
                mean, var = bn_statistics(x)
                fields = [mean, var]
                if cells:
                    fields += list(patch_statistics(x, cells))
                fields = [maybe_ema(("conv", t_index, i, j), f) for j, f in enumerate(fields)]
                stats.append(ConvStatistics(*fields))
            conv_loss = conv_statistics_loss(stats, targets, c["stat_norm"], float(c["conv_drop"]), self.generator)
        return bn_loss, conv_loss

    def _start_batch(self, labels: torch.Tensor, batch_index: int, saved=None):
        """The optimisation state of a batch: fresh (noise from the batch's own generator) or as
        ``saved`` (a :meth:`_batch_state` from a checkpoint). Returns (x, optimizer, ema, log, next
        iteration)."""
        c = self.config
        self.generator = make_generator(self.seed * 100003 + batch_index)
        if saved is None:
            shape = (labels.numel(), *self.real.image_shape)
            x = torch.randn(shape, generator=self.generator).to(self.device).requires_grad_(True)
            return x, torch.optim.Adam([x], lr=float(c["lr"]), betas=tuple(c["betas"])), {}, [], 0
        tensors, meta = saved
        x = tensors["x"].to(self.device).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=float(c["lr"]), betas=tuple(c["betas"]))
        optimizer.state[x] = {name: tensors[f"adam.{name}"].to(self.device if name != "step" else "cpu").clone()
                              for name in ("step", "exp_avg", "exp_avg_sq")}
        restore_generator(self.generator, tensors["generator"])
        ema = {tuple(json.loads(name[len("ema."):])): value.to(self.device)
               for name, value in tensors.items() if name.startswith("ema.")}
        return x, optimizer, ema, list(meta["log"]), int(meta["iteration"])

    def _batch_state(self, x, optimizer, ema: dict) -> dict[str, torch.Tensor]:
        """Everything :meth:`_start_batch` needs to continue a batch exactly: the images, Adam's
        moments and step, the batch generator and the EMA statistics."""
        state = optimizer.state[x]
        tensors = {"x": x.detach(), "generator": generator_state(self.generator)}
        tensors.update({f"adam.{name}": state[name] for name in ("step", "exp_avg", "exp_avg_sq")})
        tensors.update({"ema." + json.dumps(list(key)): value.detach() for key, value in ema.items()})
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
        x, optimizer, ema, log, start = self._start_batch(labels, batch_index, saved)
        base_lr = float(c["lr"])
        log_every = max(1, int(c["log_every"]))
        bar.update(start)
        started = time.perf_counter()
        for it in range(start, iterations):
            distributed.maybe_inject_fault(first_step + it)
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * base_lr * (1 + math.cos(math.pi * it / iterations))
            t_index = it % len(self.teachers)
            teacher = self.teachers[t_index]
            x_aug, low = _augment(x, c, self.real, self.generator, it, iterations)
            with capture_inputs(teacher.model, (nn.BatchNorm2d, nn.Conv2d)) as taps:
                logits = teacher.model(x_aug)
            ce = F.cross_entropy(logits, labels)
            bn_loss, conv_loss = self._statistics_losses(t_index, taps, ema)
            dense = densification_loss(x, labels, int(c["densify_pool"]), float(c["densify_temperature"]),
                                       bool(c["densify_normalize"])) if float(c["densify_weight"]) > 0 else ce * 0.0
            total = ce + float(c["r_bn"]) * bn_loss + float(c["r_conv"]) * conv_loss + float(c["densify_weight"]) * dense
            if not torch.isfinite(total):
                raise NonFiniteLoss(f"the loss became {float(total.detach())} at iteration {it} of batch {batch_index}; "
                                    "lower the learning rate (--set lr=...) or r_bn/r_conv")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, self.high), self.low))
            if it % log_every == 0 or it == iterations - 1:
                values = {name: float(v.detach()) for name, v in
                          (("ce", ce), ("bn", bn_loss), ("conv", conv_loss), ("dense", dense), ("total", total))}
                values.update({"crop_min": low,
                               "acc": float((logits.argmax(1) == labels).float().mean())})
                log.append({"batch": batch_index, "iteration": it, **{k: round(v, 6) for k, v in values.items()}})
                bar.set_postfix({"ce": f"{values['ce']:.3g}", "bn": f"{values['bn']:.3g}", "acc": f"{values['acc']:.2f}"})
            bar.update(1)
            if self._store is not None and it + 1 < iterations:
                every = self._checkpoint_interval(started, it + 1 - start)
                if every and (it + 1) % every == 0:
                    self._store.save_running(batch_index, self._batch_state(x, optimizer, ema),
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
                    self._store.save_done(b, {"pixels": pixels}, {"log": log})
        seconds = time.perf_counter() - started
        labels = torch.arange(k).repeat_interleave(self.ipc)
        record = {"recover_seconds": round(seconds, 3),
                  "seconds_per_iteration": round(seconds / max(1, computed_steps), 4),
                  "loss_log": self.log, "rows": torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)}
        return images, labels, record
