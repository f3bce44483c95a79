"""Replay plans: the per-(epoch, sample) augmentation records behind FKD-style soft labels.

The statistics-matching family (SRe2L, CDA, G-VBSM) relabels its synthetic images once
with a teacher: for every record epoch ``e`` and stored image ``i`` it draws a RandomResizedCrop
box, a flip and a mixing partner, runs the teacher on exactly that input and stores the logits.
The student later *replays* the same input and learns from the stored logits.

A :class:`ReplayPlan` holds those draws as plain integer / float tensors, and
:func:`replay_inputs` rebuilds the input of any ``(epoch, sample)`` from them. The input of sample
``i`` at epoch ``e`` is a pure function of ``(images, plan, e, i)``:

* ``a = flip(crop(x_i))`` with sample ``i``'s own box and flip of epoch ``e``;
* ``p = partner[e, i]`` and ``b = flip(crop(x_p))`` with *p's own* box and flip of epoch ``e``;
* CutMix: ``b``'s pixels inside ``mix_box[e, i]`` are pasted into ``a``; the hard-label weight of
  ``y_i`` is ``lam_i = 1 - box_area / (H * W)`` (``y_p`` gets ``1 - lam_i``);
  mixup: ``lam_i * a + (1 - lam_i) * b`` with ``lam_i = mix_lam[e, i]``; no mixing: ``a``.

Design note (differs from FKD on purpose): FKD draws one mixing permutation and one mix parameter
per *batch*, so its records are tied to the batch size and to the sampler's order. Here the
partner is drawn as one random permutation of all ``N`` samples per epoch and the mix box / lam
per ``(epoch, sample)``, so the records, and therefore every replayed input, are independent of
any batch size, batch order or sampler state (as SRe2L's FKD records should: never tied to the sampler's random order).

Nothing here touches the global RNG: every draw goes through the caller's ``torch.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ddkit.errors import DDKitError

from .crops import CropParams, apply_crops, apply_padded_crops, sample_crops, sample_padded_crops

__all__ = [
    "MIX_MODES",
    "RECORD_PREFIX",
    "ReplayPlan",
    "sample_replay_plan",
    "replay_inputs",
    "cutmix_box",
]

#: the mixing modes of a plan
MIX_MODES = ("cutmix", "mixup", "none")
#: name prefix of every relabel record in ``DistilledSet.extras``
RECORD_PREFIX = "relabel."
_INT16_MAX = 32767


@dataclass(frozen=True)
class ReplayPlan:
    """The augmentation draws of ``E`` record epochs over ``N`` stored images.

    Attributes:
        crop: int16 ``[E, N, 4]`` crop boxes ``(top, left, height, width)`` in input pixels (rows
            ``[top, top + height)``, columns ``[left, left + width)``): RandomResizedCrop boxes, or
            with ``padding`` the windows of a padded RandomCrop (``top``, ``left`` in
            ``[-padding, padding]``, the full image size; rows outside the image are padding).
        flip: uint8 ``[E, N]``, 1 = mirror the crop left-right.
        partner: int32 ``[E, N]``, the sample mixed into sample ``i`` at epoch ``e`` (a
            permutation of ``0..N-1`` per epoch; the identity when ``mix == "none"``).
        mix: ``"cutmix"``, ``"mixup"`` or ``"none"``.
        mix_box: int16 ``[E, N, 4]`` CutMix boxes ``(top, left, height, width)`` in output pixels
            (``mix == "cutmix"`` only, else None).
        mix_lam: float32 ``[E, N]`` mixup weights of sample ``i`` (``mix == "mixup"`` only).
        padding: 0 for RandomResizedCrop boxes, else the padding of RandomCrop windows.
    """

    crop: torch.Tensor
    flip: torch.Tensor
    partner: torch.Tensor
    mix: str = "cutmix"
    mix_box: torch.Tensor | None = None
    mix_lam: torch.Tensor | None = None
    padding: int = 0

    def __post_init__(self):
        if self.mix not in MIX_MODES:
            raise DDKitError(f"mix={self.mix!r} is not valid; choose one of: {', '.join(MIX_MODES)}")
        if self.crop.dim() != 3 or self.crop.shape[2] != 4:
            raise DDKitError(f"replay crop records must be [E, N, 4], got {tuple(self.crop.shape)}; the set is damaged")
        shape = tuple(self.crop.shape[:2])
        for name, tensor in (("flip", self.flip), ("partner", self.partner)):
            if tuple(tensor.shape) != shape:
                raise DDKitError(
                    f"replay {name} records have shape {tuple(tensor.shape)} but crops have {shape}; the set is damaged"
                )
        if self.mix == "cutmix" and (self.mix_box is None or tuple(self.mix_box.shape) != shape + (4,)):
            raise DDKitError(f"a cutmix replay plan needs mix_box records of shape {shape + (4,)}; the set is damaged")
        if self.mix == "mixup" and (self.mix_lam is None or tuple(self.mix_lam.shape) != shape):
            raise DDKitError(f"a mixup replay plan needs mix_lam records of shape {shape}; the set is damaged")

    @classmethod
    def identity(cls, num_samples: int, height: int, width: int) -> ReplayPlan:
        """One epoch that replays every image as it is: the whole image as its crop, no flip, no
        mix (the soft protocol without augmentation)."""
        crop = torch.tensor([0, 0, height, width], dtype=torch.int16).expand(1, num_samples, 4).clone()
        return cls(crop=crop, flip=torch.zeros(1, num_samples, dtype=torch.uint8),
                   partner=torch.arange(num_samples, dtype=torch.int32).unsqueeze(0), mix="none")

    @property
    def epochs(self) -> int:
        """Number of record epochs ``E``."""
        return int(self.crop.shape[0])

    @property
    def num_samples(self) -> int:
        """Number of samples ``N`` each epoch covers."""
        return int(self.crop.shape[1])

    def to(self, device) -> ReplayPlan:
        """The same plan with every tensor on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ReplayPlan(move(self.crop), move(self.flip), move(self.partner), self.mix, move(self.mix_box),
                          move(self.mix_lam), self.padding)

    def to_extras(self) -> dict[str, torch.Tensor]:
        """The records as ``DistilledSet.extras`` entries: ``relabel.crop``, ``relabel.flip``,
        ``relabel.partner``, ``relabel.mix_box`` (cutmix) or ``relabel.mix_lam`` (mixup), and
        ``relabel.crop_padding`` (int16 ``[1]``, padded RandomCrop windows only); CPU tensors in
        their storage dtypes."""
        out = {
            RECORD_PREFIX + "crop": self.crop.to("cpu", torch.int16),
            RECORD_PREFIX + "flip": self.flip.to("cpu", torch.uint8),
            RECORD_PREFIX + "partner": self.partner.to("cpu", torch.int32),
        }
        if self.mix == "cutmix":
            out[RECORD_PREFIX + "mix_box"] = self.mix_box.to("cpu", torch.int16)
        elif self.mix == "mixup":
            out[RECORD_PREFIX + "mix_lam"] = self.mix_lam.to("cpu", torch.float32)
        if self.padding:
            out[RECORD_PREFIX + "crop_padding"] = torch.tensor([self.padding], dtype=torch.int16)
        return out

    @classmethod
    def from_extras(cls, extras: dict[str, torch.Tensor]) -> ReplayPlan:
        """Rebuild a plan from ``DistilledSet.extras`` (inverse of :meth:`to_extras`).

        The mix mode follows from which record is present: ``relabel.mix_box`` -> cutmix,
        ``relabel.mix_lam`` -> mixup, neither -> none.

        Raises:
            DDKitError: no relabel records, or records of inconsistent shapes.
        """
        missing = [k for k in ("crop", "flip", "partner") if RECORD_PREFIX + k not in extras]
        if missing:
            raise DDKitError(
                f"the set has no relabel records ({RECORD_PREFIX}{missing[0]} missing); relabel it with "
                "ddkit.methods.relabel.relabel(...) first"
            )
        box, lam = extras.get(RECORD_PREFIX + "mix_box"), extras.get(RECORD_PREFIX + "mix_lam")
        if box is not None and lam is not None:
            raise DDKitError("the set has both cutmix and mixup relabel records; the set is damaged")
        mix = "cutmix" if box is not None else "mixup" if lam is not None else "none"
        padding = extras.get(RECORD_PREFIX + "crop_padding")
        return cls(extras[RECORD_PREFIX + "crop"], extras[RECORD_PREFIX + "flip"], extras[RECORD_PREFIX + "partner"],
                   mix, box, lam, int(padding.reshape(-1)[0]) if padding is not None else 0)

    def crop_params(self, epoch: torch.Tensor, index: torch.Tensor, image_size: tuple[int, int]) -> CropParams:
        """The :class:`~ddkit.augment.crops.CropParams` of samples ``index`` at epochs ``epoch``
        (both int64 ``[B]`` on the plan's device), for images of ``image_size = (H, W)``."""
        box = self.crop[epoch, index].long()
        return CropParams(box[:, 0], box[:, 1], box[:, 2], box[:, 3], self.flip[epoch, index].bool(),
                          tuple(image_size))


def _beta(n: int, beta: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws of Beta(beta, beta) as float64 on the CPU, driven by ``generator``.

    torch has no public Beta sampler that takes a generator, so one 62-bit integer is drawn from
    ``generator`` and seeds a NumPy ``Generator`` that draws the values (deterministic, global
    RNG untouched)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return torch.from_numpy(np.random.default_rng(seed).beta(beta, beta, size=n))


def cutmix_box(lam: torch.Tensor, image_size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """CutMix boxes for mixing weights ``lam`` (float ``[n]`` in [0, 1]).

    As in CutMix: the box sides are ``cut_h = int(H * sqrt(1 - lam))``, ``cut_w = int(W *
    sqrt(1 - lam))``; the centre ``(cy, cx)`` is uniform over the integer pixels (one ``torch.rand``
    ``[n]`` for ``cy`` then one for ``cx``); the box ``[cy - cut_h // 2, cy - cut_h // 2 + cut_h)``
    (same for columns) is clipped to the image. The effective weight is therefore
    ``1 - h * w / (H * W)`` of the clipped box, not ``lam``.

    Returns:
        int64 ``[n, 4]`` rows ``(top, left, height, width)`` in output pixels (``height`` or
        ``width`` may be 0: nothing is pasted).
    """
    height, width = image_size
    dev = generator.device
    cut = torch.sqrt(1.0 - lam.double().clamp(0.0, 1.0))
    cut_h = torch.floor(height * cut).long().cpu()
    cut_w = torch.floor(width * cut).long().cpu()
    n = lam.shape[0]
    cy = torch.floor(torch.rand(n, generator=generator, device=dev, dtype=torch.float64) * height).long().cpu()
    cx = torch.floor(torch.rand(n, generator=generator, device=dev, dtype=torch.float64) * width).long().cpu()
    cy, cx = cy.clamp(max=height - 1), cx.clamp(max=width - 1)
    y1 = (cy - cut_h // 2).clamp(0, height)
    y2 = (cy - cut_h // 2 + cut_h).clamp(0, height)
    x1 = (cx - cut_w // 2).clamp(0, width)
    x2 = (cx - cut_w // 2 + cut_w).clamp(0, width)
    return torch.stack((y1, x1, y2 - y1, x2 - x1), dim=1)


def sample_replay_plan(
    n: int,
    epochs: int,
    image_size: int | tuple[int, int],
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    flip_prob: float = 0.5,
    mix: str = "cutmix",
    beta: float = 1.0,
    padding: int = 0,
) -> ReplayPlan:
    """Draw the crops, flips and mixing of ``epochs`` record epochs over ``n`` images.

    Per epoch, in this order: :func:`~ddkit.augment.crops.sample_crops` of ``n`` per-sample boxes
    and flips (RandomResizedCrop with ``scale``, ratio 3/4..4/3; with ``padding`` > 0 instead
    :func:`~ddkit.augment.crops.sample_padded_crops`, RandomCrop with that padding, as SRe2L's
    CIFAR-100 evaluation draws); for ``mix != "none"`` one
    ``torch.randperm(n)`` (the partners); then ``lam ~ Beta(beta, beta)`` per sample (see
    :func:`_beta`) and, for cutmix, the box centres (:func:`cutmix_box`). Because epochs are drawn
    one after another, the plan of ``E`` epochs is the first ``E`` epochs of a longer plan from the
    same generator state.

    Args:
        n: number of stored images ``N`` (>= 1).
        epochs: record epochs ``E`` (>= 1).
        image_size: ``H`` or ``(H, W)`` in pixels (at most 32767).
        generator: the source of every draw.
        scale: RandomResizedCrop area fraction range.
        flip_prob: probability of a horizontal flip per (epoch, sample); 0 for digits.
        mix: ``"cutmix"``, ``"mixup"`` or ``"none"``.
        beta: the Beta(beta, beta) parameter of the mixing weight (> 0).
        padding: 0 for RandomResizedCrop, else the padding of a RandomCrop in pixels.

    Returns:
        a :class:`ReplayPlan` of CPU tensors.
    """
    for name, value in (("n", n), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DDKitError(f"{name}={value!r} is not valid; give an integer >= 1")
    if mix not in MIX_MODES:
        raise DDKitError(f"mix={mix!r} is not valid; choose one of: {', '.join(MIX_MODES)}")
    if mix != "none" and not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta > 0
                              and math.isfinite(beta)):
        raise DDKitError(f"mix beta={beta!r} is not valid; give a positive number (1.0 = uniform)")
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if max(hw) > _INT16_MAX:
        raise DDKitError(f"image size {hw} is too large for int16 replay records (max {_INT16_MAX})")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise DDKitError(f"padding={padding!r} is not valid; give 0 (RandomResizedCrop) or the RandomCrop padding")
    crops, flips, partners, boxes, lams = [], [], [], [], []
    for _ in range(epochs):
        if padding:
            params = sample_padded_crops(n, hw, generator, padding, per_sample=True, flip_prob=flip_prob)
        else:
            params = sample_crops(n, hw, generator, scale=scale, per_sample=True, flip_prob=flip_prob)
        crops.append(params.boxes().cpu())
        flips.append(params.flip.cpu())
        if mix == "none":
            partners.append(torch.arange(n))
            continue
        partners.append(torch.randperm(n, generator=generator, device=generator.device).cpu())
        lam = _beta(n, float(beta), generator)
        if mix == "cutmix":
            boxes.append(cutmix_box(lam, hw, generator))
        else:
            lams.append(lam)
    return ReplayPlan(
        crop=torch.stack(crops).to(torch.int16),
        flip=torch.stack(flips).to(torch.uint8),
        partner=torch.stack(partners).to(torch.int32),
        mix=mix,
        mix_box=torch.stack(boxes).to(torch.int16) if mix == "cutmix" else None,
        mix_lam=torch.stack(lams).to(torch.float32) if mix == "mixup" else None,
        padding=padding,
    )


def replay_inputs(
    images: torch.Tensor, plan: ReplayPlan, epoch: int | torch.Tensor, index: torch.Tensor, fill=0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rebuild the recorded inputs of samples ``index`` at record epoch ``epoch``.

    Batched: one :func:`~ddkit.augment.crops.apply_crops` call for the samples themselves and one
    for their partners, no loop over samples. Each output row depends only on ``(images, plan,
    epoch, i)``, never on the rest of the batch, so a sample's input is bit-identical whatever the
    batch size or order.

    Args:
        images: all ``N`` stored images, normalised float ``[N, C, H, W]``, on the compute device.
        plan: the records (any device); ``plan.num_samples == N``.
        epoch: a record epoch in ``[0, E)``, or int64 ``[B]`` (one epoch per sample).
        index: int64 ``[B]`` sample indices in ``[0, N)``.
        fill: the padding value of a padded-crop plan in ``images``' units (a number or one per
            channel); torchvision pads before normalising, i.e. with the normalised black.

    Returns:
        ``(inputs, partner, lam)``: inputs float ``[B, C, H, W]`` on ``images``' device; partner
        int64 ``[B]`` (the sample mixed in; ``index`` itself when ``mix == "none"``); lam float32
        ``[B]``, the hard-label weight of ``y_index`` (``1 - lam`` goes to ``y_partner``).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise DDKitError("replay_inputs expects normalised float images [N, C, H, W]")
    n_img, _, height, width = images.shape
    if n_img != plan.num_samples:
        raise DDKitError(
            f"the replay plan covers {plan.num_samples} images but {n_img} were given; replay the set the "
            "records were made for"
        )
    pdev = plan.crop.device
    index = torch.as_tensor(index).to(pdev, torch.long).reshape(-1)
    epoch_t = torch.as_tensor(epoch).to(pdev, torch.long).reshape(-1)
    if epoch_t.numel() == 1:
        epoch_t = epoch_t.expand(index.numel())
    if epoch_t.numel() != index.numel():
        raise DDKitError(f"{epoch_t.numel()} epochs for {index.numel()} samples; give one epoch or one per sample")
    if index.numel() and (int(epoch_t.min()) < 0 or int(epoch_t.max()) >= plan.epochs):
        raise DDKitError(f"record epoch out of range [0, {plan.epochs}); cycle epochs with epoch % {plan.epochs}")
    size = (int(height), int(width))
    dev = images.device
    crop_a = plan.crop_params(epoch_t, index, size)
    if plan.padding:
        misfit = index.numel() and (bool((crop_a.height != height).any()) or bool((crop_a.width != width).any())
                                    or int(torch.maximum(crop_a.top.abs(), crop_a.left.abs()).max()) > plan.padding)
    else:
        misfit = index.numel() and (int((crop_a.top + crop_a.height).max()) > height or
                                    int((crop_a.left + crop_a.width).max()) > width)
    if misfit:
        raise DDKitError(
            f"replay crop boxes do not fit {height}x{width} images; replay the set the records were made for"
        )
    move = lambda p: CropParams(*(t.to(dev) for t in (p.top, p.left, p.height, p.width, p.flip)), size)  # noqa: E731

    def crop(x, params):
        return apply_padded_crops(x, move(params), fill) if plan.padding else apply_crops(x, move(params), size)

    a = crop(images[index.to(dev)], crop_a)
    if plan.mix == "none":
        return a, index.to(dev), torch.ones(index.numel(), dtype=torch.float32, device=dev)
    partner = plan.partner[epoch_t, index].long()
    b = crop(images[partner.to(dev)], plan.crop_params(epoch_t, partner, size))
    if plan.mix == "cutmix":
        box = plan.mix_box[epoch_t, index].long().to(dev)
        top, left, h, w = box.unbind(1)
        rows = torch.arange(height, device=dev)
        cols = torch.arange(width, device=dev)
        in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # [B, H]
        in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # [B, W]
        mask = in_rows[:, None, :, None] & in_cols[:, None, None, :]
        lam = 1.0 - (h * w).to(torch.float32) / float(height * width)
        return torch.where(mask, b, a), partner.to(dev), lam
    lam = plan.mix_lam[epoch_t, index].to(dev, torch.float32)
    weight = lam.to(a.dtype).view(-1, 1, 1, 1)
    return weight * a + (1.0 - weight) * b, partner.to(dev), lam
