"""Relabel a distilled set with a teacher ensemble: FKD-style per-(epoch, sample) soft labels.

SRe2L, CDA and G-VBSM train their students on soft labels that a teacher gives
to randomly cropped, flipped and mixed views of the synthetic images. :func:`relabel` draws those
views once for ``E`` record epochs (a :class:`ddkit.augment.replay.ReplayPlan`), runs the teacher
ensemble on exactly each view and stores the logits (fp16) beside the images, in
``DistilledSet.extras``:

============================== ============ ===============================================
name                           dtype        shape / meaning
============================== ============ ===============================================
``relabel.crop``               int16        ``[E, N, 4]`` crop box (top, left, h, w), input px
``relabel.crop_padding``       int16        ``[1]`` RandomCrop padding (padded crops only)
``relabel.flip``               uint8        ``[E, N]`` 1 = mirrored
``relabel.partner``            int32        ``[E, N]`` sample mixed into ``i`` (``i``: none)
``relabel.mix_box``            int16        ``[E, N, 4]`` CutMix box (cutmix only)
``relabel.mix_lam``            float32      ``[E, N]`` mixup weight (mixup only)
``relabel.logits``             float16      ``[E, N, K]`` ensemble logits on that input
``relabel.topk_values``        float16      ``[E, N, k]`` (instead of logits, with ``topk``)
``relabel.topk_indices``       int16        ``[E, N, k]`` class of each kept logit
============================== ============ ===============================================

The evaluation side is :mod:`ddkit.evaluate.soft` (``evaluate(..., protocol="soft")``).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from ddkit import distributed, precision
from ddkit.augment.crops import padding_for
from ddkit.augment.dsa import dsa_strategy_for
from ddkit.augment.replay import MIX_MODES, RECORD_PREFIX, ReplayPlan, replay_inputs, sample_replay_plan
from ddkit.errors import DDKitError
from ddkit.methods.shards import SHARD_FOLDER, write_shard
from ddkit.store import DistilledSet
from ddkit.utils import check_flag, check_number, make_generator, normalize, progress, resolve_device

__all__ = ["NORM_SCOPES", "ensemble_logits", "auto_flip_prob", "plan_for", "padding_fill", "relabel", "EVAL_LOSSES"]

#: how :func:`ensemble_logits` measures a teacher's logit norm when equalising
NORM_SCOPES = ("sample", "batch")
#: evaluation losses a relabelled set may ask for (``meta["relabel"]["eval_loss"]``)
EVAL_LOSSES = ("kl", "mse_ce")


def _as_teacher_list(teachers) -> list[torch.nn.Module]:
    if isinstance(teachers, torch.nn.Module):
        teachers = [teachers]
    teachers = list(teachers) if teachers is not None else []
    if not teachers or not all(isinstance(t, torch.nn.Module) for t in teachers):
        raise DDKitError("teachers must be one torch.nn.Module or a non-empty list of them (images -> logits)")
    return teachers


def ensemble_logits(
    teachers: Sequence[torch.nn.Module] | torch.nn.Module,
    inputs: torch.Tensor,
    equalize_norm: bool = False,
    norm_scope: str = "sample",
) -> torch.Tensor:
    """The mean of the teachers' logits on ``inputs`` (G-VBSM's soft labels).

    With ``equalize_norm`` (G-VBSM's ImageNet variant) each teacher's logits are first rescaled to
    a common norm, the mean of the teachers' norms, so no teacher dominates by logit scale:
    ``z_t <- z_t * mean_s(||z_s||) / ||z_t||``. ``norm_scope`` says what ``||.||`` covers:

    * ``"sample"`` (default): the L2 norm of each sample's logit row ``[K]`` (the Frobenius norm
      of a ``[1, K]`` batch). Each sample's target then depends on that sample alone, so stored
      records and online targets agree whatever the batch size. (ddkit's default; documented
      deviation.)
    * ``"batch"``: the Frobenius norm of the whole ``[B, K]`` logit matrix, the literal reading
      of G-VBSM; targets then depend on how the inputs were batched.

    Runs the teachers as they are (no mode change, gradients as the caller's context says);
    :func:`relabel` wraps this in ``eval()`` and ``no_grad``.

    Args:
        teachers: modules mapping normalised images ``[B, C, H, W]`` to logits ``[B, K]``.
        inputs: float ``[B, C, H, W]`` on the teachers' device.

    Returns:
        float32 ``[B, K]`` ensemble logits.
    """
    teachers = _as_teacher_list(teachers)
    if norm_scope not in NORM_SCOPES:
        raise DDKitError(f"norm_scope={norm_scope!r} is not valid; choose one of: {', '.join(NORM_SCOPES)}")
    outputs = []
    for teacher in teachers:
        out = teacher(inputs)
        if out.dim() != 2 or (outputs and out.shape != outputs[0].shape):
            raise DDKitError(
                f"teacher {type(teacher).__name__} returned logits of shape {tuple(out.shape)}; every teacher must "
                "return [B, K] with the same K"
            )
        outputs.append(out.float())
    stacked = torch.stack(outputs)  # [T, B, K]
    if equalize_norm:
        if norm_scope == "sample":
            norms = stacked.norm(dim=2, keepdim=True)  # [T, B, 1]
        else:
            norms = stacked.flatten(1).norm(dim=1).view(-1, 1, 1)  # [T, 1, 1]
        target = norms.mean(dim=0, keepdim=True)
        stacked = stacked * (target / norms.clamp_min(1e-12))
    return stacked.mean(dim=0)


def _sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, in its own dtype (each element is non-zero on one rank at
    most, so the sum is exact; gloo reduces in int32 / float32)."""
    wide = tensor.to(torch.float32 if tensor.is_floating_point() else torch.int32)
    torch.distributed.all_reduce(wide)
    return wide.to(tensor.dtype)


def _shared_folder(shard_dir, world) -> Path:
    """Rank 0's shard folder on every rank (``shard_dir``, or a new temporary folder)."""
    folder = [str(shard_dir if shard_dir is not None else tempfile.mkdtemp(prefix="ddkit-relabel-"))
              if world.is_main else None]
    if world.distributed:
        torch.distributed.broadcast_object_list(folder, src=0)
    return Path(folder[0])


def _gather_shards(shards: list[dict]) -> list[dict]:
    """Every rank's shard entries, in epoch order."""
    parts = [None] * distributed.current().size
    torch.distributed.all_gather_object(parts, shards)
    return sorted((entry for part in parts for entry in part), key=lambda entry: entry["epochs"][0])


def auto_flip_prob(dataset: str, flip_prob: float | None) -> float:
    """``flip_prob`` itself, or for None 0.5 when the dataset's DSA strategy flips and 0.0 when it
    does not (digits: MNIST, SVHN, digits, as DSA's strategy)."""
    if flip_prob is not None:
        return float(flip_prob)
    return 0.5 if "flip" in dsa_strategy_for(dataset).split("_") else 0.0


def plan_for(
    dataset: str,
    n: int,
    image_size: tuple[int, int],
    epochs: int,
    seed: int = 0,
    crop_scale=(0.08, 1.0),
    flip_prob: float | None = None,
    mix: str = "cutmix",
    mix_beta: float = 1.0,
    padding: int = 0,
) -> ReplayPlan:
    """The replay plan :func:`relabel` draws for these settings: ``sample_replay_plan`` with a
    generator seeded by ``seed`` and flips chosen by :func:`auto_flip_prob`. The soft protocol's
    online-teacher mode calls it too, so the same settings give the same inputs.

    Args:
        dataset: the real dataset's name (decides flips when ``flip_prob`` is None).
        n: number of images; image_size: ``(H, W)`` in pixels; epochs: record epochs ``E``.
        padding: 0 for RandomResizedCrop views, else the padding of RandomCrop views.
    """
    return sample_replay_plan(n, int(epochs), tuple(int(v) for v in image_size), make_generator(seed),
                              scale=tuple(float(v) for v in crop_scale), flip_prob=auto_flip_prob(dataset, flip_prob),
                              mix=mix, beta=float(mix_beta), padding=int(padding))


def padding_fill(distilled_or_mean, std=None) -> torch.Tensor:
    """The normalised value of a black pixel per channel ``[C]``: what torchvision's RandomCrop pads
    an image with before it is normalised (from a set, or from ``mean`` and ``std``)."""
    mean = getattr(distilled_or_mean, "mean", distilled_or_mean)
    std = getattr(distilled_or_mean, "std", std)
    return normalize(torch.zeros(1, len(mean), 1, 1), mean, std).reshape(-1)


def relabel(
    distilled,
    teachers: Sequence[torch.nn.Module] | torch.nn.Module,
    epochs: int,
    seed: int = 0,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    flip_prob: float | None = None,
    mix: str = "cutmix",
    mix_beta: float = 1.0,
    topk: int | None = None,
    equalize_norm: bool = False,
    norm_scope: str = "sample",
    batch_size: int = 256,
    device: str | torch.device | None = "cpu",
    teacher_info: list | None = None,
    eval_loss: str | None = None,
    show_progress: bool = True,
    crop: str = "resized",
    crop_padding: int | str = "auto",
    eval_recipe: str | None = None,
    shard_epochs: int = 0,
    shard_dir=None,
):
    """Store FKD-style soft-label records of a teacher ensemble on ``epochs`` replayed views.

    For each record epoch ``e`` and stored image ``i`` the view of
    :func:`ddkit.augment.replay.replay_inputs` (crop, flip, mix with a partner) is built and the
    ensemble's logits on it (:func:`ensemble_logits`) are stored as fp16. The ``E * N`` views are
    processed in chunks of ``batch_size`` (flattened over epochs, so small sets still fill a
    chunk), with the teachers in eval mode and without gradients; their train/eval flags are
    restored afterwards. The teachers are moved to ``device`` (``Module.to`` acts in place).

    Args:
        distilled: a :class:`ddkit.DistilledSet` (identity-decoded; images pixel space [0, 1]).
        teachers: one module or a list, each mapping NORMALISED images ``[B, C, H, W]`` (the set's
            mean/std) to logits ``[B, K]`` with ``K == distilled.num_classes``.
        epochs: record epochs ``E`` (the student cycles through them).
        seed: seeds the plan's generator (crops, flips, partners, mixing).
        crop_scale: RandomResizedCrop area range (SRe2L: 0.08..1).
        crop: ``"resized"`` (RandomResizedCrop, FKD) or ``"padded"`` (RandomCrop with
            ``crop_padding``, ``"auto"`` = 4 px at 32 px; SRe2L's CIFAR-100 evaluation), padded with
            black as torchvision pads an image before normalising.
        flip_prob: horizontal-flip probability; None = automatic (0.5, or 0 for digit datasets).
        mix: ``"cutmix"`` (SRe2L/FKD), ``"mixup"`` or ``"none"``.
        mix_beta: the Beta(beta, beta) parameter of the mixing weight.
        topk: keep only the ``k`` largest logits per view (``relabel.topk_values`` /
            ``relabel.topk_indices``) instead of all ``K``; None keeps all.
        equalize_norm, norm_scope: see :func:`ensemble_logits` (G-VBSM ImageNet: True).
        batch_size: views per teacher pass.
        device: where the teachers run ("cpu", "cuda", "auto").
        teacher_info: a JSON-able description of the teachers (arch names, checkpoint keys),
            stored in ``meta["relabel"]["teacher_info"]``.
        eval_loss: the loss the soft protocol should use for this set ("kl" or "mse_ce"; stored
            as ``meta["relabel"]["eval_loss"]``, read by ``loss="auto"``); None leaves it unset
            (the protocol then uses "kl").
        show_progress: tqdm bar over the chunks.
        eval_recipe: the evaluation recipe the soft protocol should use for this set (a name of
            :data:`ddkit.evaluate.soft.SOFT_RECIPES`, stored as ``meta["relabel"]["eval_recipe"]``,
            read by ``recipe="auto"``); None leaves it unset.
        shard_epochs: 0 keeps the logits in ``extras`` (one ``[E, N, K]`` tensor); ``S > 0`` writes
            them in shards of ``S`` epochs (:mod:`ddkit.methods.shards`), holding one shard in
            memory at a time; the shards go into the set's folder when it is saved, and
            ``meta["relabel"]["shards"]`` lists them with their sha256. The records are the same.
        shard_dir: where the shards are written until the set is saved (a new folder; default a
            temporary one in the system's temporary directory). Under torchrun rank 0's is used.

    Under torchrun (``WORLD_SIZE > 1``) every rank calls this with the same arguments and labels a
    share of the views: of the chunks of ``batch_size`` views (unsharded records, gathered into
    every rank's result), or of the shards (written by their ranks into rank 0's ``shard_dir``,
    which must be on a file system all ranks share). The records equal a one-process run's: each
    chunk is the same batch of views through the same teachers.

    Returns:
        A new DistilledSet: the same images, labels and metadata (deep-copied; earlier soft-protocol
        evaluations dropped, as they judged other records), the records in ``extras`` (earlier
        ``relabel.*`` extras replaced) and ``meta["relabel"]``, a JSON-able dict of every setting.

    Raises:
        DDKitError: bad settings, a partition-decoded set, or teachers whose class count differs
            from the set's.
    """
    if not isinstance(distilled, DistilledSet):
        raise DDKitError("relabel expects a ddkit.DistilledSet; load it with ddkit.load(path) first")
    if distilled.decode_factor != 1:
        raise DDKitError(
            f"relabel works on stored images used as training images, but this set decodes each stored image into "
            f"{distilled.decode_factor} (decode {distilled.decode}); relabel an identity-decoded set"
        )
    teachers = _as_teacher_list(teachers)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        check_number("relabel", name, value, integer=True, minimum=1)
    check_number("relabel", "mix_beta", mix_beta, above=0)
    check_flag("relabel", "equalize_norm", equalize_norm)
    if mix not in MIX_MODES:
        raise DDKitError(f"mix={mix!r} is not valid; choose one of: {', '.join(MIX_MODES)}")
    if crop not in ("resized", "padded"):
        raise DDKitError(f"relabel option crop={crop!r} is not valid; choose one of: resized, padded")
    if crop_padding != "auto":
        check_number("relabel", "crop_padding", crop_padding, integer=True, minimum=1)
    if norm_scope not in NORM_SCOPES:
        raise DDKitError(f"norm_scope={norm_scope!r} is not valid; choose one of: {', '.join(NORM_SCOPES)}")
    if eval_loss is not None and eval_loss not in EVAL_LOSSES:
        raise DDKitError(f"eval_loss={eval_loss!r} is not valid; choose one of: {', '.join(EVAL_LOSSES)} or None")
    num_classes = distilled.num_classes
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= num_classes
                             or num_classes > 32767):
        raise DDKitError(
            f"topk={topk!r} is not valid; give an integer in [1, {num_classes}] or None to keep all logits"
        )
    device = resolve_device(device)
    started = time.perf_counter()

    n = int(distilled.images.shape[0])
    height, width = distilled.image_shape[1:]
    flip = auto_flip_prob(distilled.dataset, flip_prob)
    padding = 0 if crop == "resized" else padding_for(height) if crop_padding == "auto" else int(crop_padding)
    plan = plan_for(distilled.dataset, n, (height, width), epochs, seed, crop_scale, flip, mix, mix_beta, padding)
    fill = padding_fill(distilled).to(device)
    images = normalize(distilled.images.float(), distilled.mean, distilled.std).to(device)
    device_plan = plan.to(device)

    check_number("relabel", "shard_epochs", shard_epochs, integer=True, minimum=0)
    keep = num_classes if topk is None else topk
    block = epochs if not shard_epochs else min(int(shard_epochs), epochs)
    modes = [t.training for t in teachers]
    amp = precision.current(device)  # the teachers' passes (ddkit.precision.using); logits kept in fp32
    for teacher in teachers:
        teacher.to(device).eval()
    world = distributed.current()
    blocks = list(range(0, epochs, block))
    # the shards (or, unsharded, the chunks of views) this rank labels
    mine = set(world.share(len(blocks))) if shard_epochs else None
    total = (sum(min(epochs, blocks[b] + block) - blocks[b] for b in mine) * n if shard_epochs
             else len(world.share(-(-epochs * n // batch_size))) * batch_size)
    bar = progress(range(-(-total // batch_size)), desc="relabel", enabled=show_progress and world.is_main)
    ticks = iter(bar)

    def label_epochs(first: int, stop: int, chunks=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp16 records ``[(stop - first) * n, keep]`` of epochs ``[first, stop)`` (and top-k indices);
        with ``chunks`` (indices of batches of ``batch_size`` views) only those are labelled, the
        rest left zero."""
        count = (stop - first) * n
        values = torch.zeros(count, keep, dtype=torch.float16)
        indices = torch.zeros(count, keep, dtype=torch.int16) if topk is not None else None
        for chunk, start in enumerate(range(0, count, batch_size)):
            if chunks is not None and chunk not in chunks:
                continue
            next(ticks, None)
            flat = torch.arange(first * n + start, first * n + min(start + batch_size, count), device=device)
            inputs, _, _ = replay_inputs(images, device_plan, flat // n, flat % n, fill)
            with amp.autocast():
                logits = amp.fp32(ensemble_logits(teachers, inputs, equalize_norm, norm_scope))
            if logits.shape[1] != num_classes:
                raise DDKitError(
                    f"the teachers give {logits.shape[1]} logits but the set has {num_classes} classes; use "
                    f"teachers trained on {distilled.dataset}"
                )
            if topk is None:
                values[start:start + flat.numel()] = logits.cpu().half()
            else:
                top_v, top_i = logits.topk(topk, dim=1)
                values[start:start + flat.numel()] = top_v.cpu().half()
                indices[start:start + flat.numel()] = top_i.cpu().to(torch.int16)
        return values, indices

    extras = {k: v.clone() for k, v in distilled.extras.items() if not k.startswith(RECORD_PREFIX)}
    extras.update(plan.to_extras())
    shards, folder = [], None
    try:
        with torch.no_grad():
            if not shard_epochs:
                chunks = set(world.share(-(-epochs * n // batch_size))) if world.distributed else None
                values, indices = label_epochs(0, epochs, chunks)
                if world.distributed:  # every view was labelled by exactly one rank; the others hold zeros
                    values, indices = _sum_over_ranks(values), None if indices is None else _sum_over_ranks(indices)
                if topk is None:
                    extras[RECORD_PREFIX + "logits"] = values.view(epochs, n, num_classes)
                else:
                    extras[RECORD_PREFIX + "topk_values"] = values.view(epochs, n, topk)
                    extras[RECORD_PREFIX + "topk_indices"] = indices.view(epochs, n, topk)
            else:
                folder = _shared_folder(shard_dir, world)
                for number, first in enumerate(blocks):
                    if number not in mine:
                        continue
                    stop = min(epochs, first + block)
                    values, indices = label_epochs(first, stop)
                    tensors = ({"logits": values.view(stop - first, n, keep)} if topk is None else
                               {"topk_values": values.view(stop - first, n, keep),
                                "topk_indices": indices.view(stop - first, n, keep)})
                    shards.append(write_shard(folder, first, stop, tensors))
                    del values, indices
                if world.distributed:
                    shards = _gather_shards(shards)
    finally:
        for teacher, mode in zip(teachers, modes):
            teacher.train(mode)
        close = getattr(bar, "close", None)
        if close is not None:
            close()
    meta = copy.deepcopy(distilled.meta)
    meta["evaluations"] = [e for e in meta.get("evaluations", []) if e.get("protocol") != "soft"]
    settings = {
        "epochs": epochs, "seed": int(seed), "crop": crop, "crop_padding": padding,
        "crop_scale": [float(v) for v in crop_scale],
        "flip_prob": flip, "flip_auto": flip_prob is None, "mix": mix,
        "mix_beta": float(mix_beta) if mix != "none" else None, "topk": topk, "equalize_norm": bool(equalize_norm),
        "norm_scope": norm_scope, "batch_size": batch_size, "teachers": len(teachers),
        "teacher_info": copy.deepcopy(teacher_info) if teacher_info is not None else None,
        "logits_dtype": "float16", "seconds": round(time.perf_counter() - started, 3), "precision": amp.name,
    }
    if shards:
        settings["shards"] = shards
        settings["shard_epochs"] = block
    if eval_loss is not None:
        settings["eval_loss"] = eval_loss
    if eval_recipe is not None:
        settings["eval_recipe"] = eval_recipe
    meta["relabel"] = settings
    result = DistilledSet(
        images=distilled.images.clone(), labels=distilled.labels.clone(), class_names=list(distilled.class_names),
        dataset=distilled.dataset, mean=distilled.mean, std=distilled.std, method=distilled.method,
        decode=copy.deepcopy(distilled.decode),
        soft_labels=None if distilled.soft_labels is None else distilled.soft_labels.clone(),
        extras=extras, meta=meta,
    )
    if shards:
        result.attachments = {SHARD_FOLDER: folder}  # moved into the set's folder by DistilledSet.save
    return result
