"""Batched RandomResizedCrop, padded RandomCrop, flips, jitter rolls and the CDA curriculum.

The statistics-matching family (SRe2L, CDA, G-VBSM) augments the synthetic batch before each
teacher pass: SRe2L and CDA (and G-VBSM on ImageNet) with a RandomResizedCrop + horizontal flip,
G-VBSM on CIFAR and Tiny-ImageNet with torchvision's padded ``RandomCrop(size, padding)`` + flip;
then a random cyclic roll ("jitter"). The relabel step must replay exactly the crop that produced
each stored soft label. So every augmentation is split in two pure steps:

* :func:`sample_crops` / :func:`sample_padded_crops` draw boxes and flips from an explicit
  ``torch.Generator`` and return a :class:`CropParams` (integer pixel boxes, storable and
  replayable);
* :func:`apply_crops` cuts and resizes the boxes out of a batch in one vectorised
  ``F.grid_sample`` call, :func:`apply_padded_crops` shifts the batch over a padded border in one
  gather; both are differentiable with respect to the images and run on the images' device.

Images are normalised tensors ``[N, C, H, W]`` (floating point). ``H`` is the row (``y``,
``top``/``height``) axis, ``W`` the column (``x``, ``left``/``width``) axis. Boxes are in input
pixels, ``[top, top + height) x [left, left + width)``. Nothing here uses the global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddkit.errors import DDKitError

__all__ = [
    "CropParams",
    "sample_crops",
    "apply_crops",
    "sample_padded_crops",
    "apply_padded_crops",
    "padding_for",
    "CROP_KINDS",
    "augment_batch",
    "random_resized_crop",
    "sample_flips",
    "apply_flips",
    "random_flip",
    "JITTER_MODES",
    "sample_jitter",
    "apply_jitter",
    "jitter_roll",
    "cda_min_scale",
    "CDA_MODES",
    "CDA_FLOOR",
]

#: lower crop-scale bound that every CDA schedule reaches at its milestone (SRe2L's 0.08)
CDA_FLOOR = 0.08
#: the curricula of :func:`cda_min_scale`
CDA_MODES = ("cosine", "linear", "step")
#: RandomResizedCrop attempts before falling back to the centre crop (as torchvision)
_CROP_TRIES = 10


@dataclass(frozen=True)
class CropParams:
    """Crop boxes and flips for a batch, as drawn by :func:`sample_crops`.

    Attributes:
        top, left, height, width: int64 tensors ``[n]`` in input pixels; the box is rows
            ``[top, top + height)`` and columns ``[left, left + width)`` of an image of size
            ``image_size``. ``n`` is the batch size, or 1 for one crop shared by the whole batch.
        flip: bool tensor ``[n]``; True mirrors the crop horizontally (left-right).
        image_size: ``(H, W)`` of the images the boxes were drawn for.
    """

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.top.shape[0])

    @property
    def shared(self) -> bool:
        """True when one box (and flip) applies to the whole batch (``n == 1``)."""
        return len(self) == 1

    def boxes(self) -> torch.Tensor:
        """``[n, 4]`` int64 rows ``(top, left, height, width)``."""
        return torch.stack((self.top, self.left, self.height, self.width), dim=1)

    def expand(self, n: int) -> CropParams:
        """These parameters for ``n`` samples: a shared crop repeated ``n`` times (``n`` = len is
        a no-op). Useful for storing one record per sample."""
        if len(self) == n:
            return self
        if not self.shared:
            raise DDKitError(
                f"cannot expand {len(self)} per-sample crops to {n}; only a shared crop (n=1) "
                "expands"
            )
        rep = lambda t: t.expand(n).clone()  # noqa: E731
        return CropParams(
            rep(self.top), rep(self.left), rep(self.height), rep(self.width), rep(self.flip),
            self.image_size,
        )  # fmt: skip

    def select(self, index: torch.Tensor | slice | int) -> CropParams:
        """Rows ``index`` of per-sample parameters (e.g. one record per stored image)."""
        pick = lambda t: t[index].reshape(-1)  # noqa: E731
        return CropParams(
            pick(self.top), pick(self.left), pick(self.height), pick(self.width), pick(self.flip),
            self.image_size,
        )  # fmt: skip


def _image_hw(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        hw = (image_size, image_size)
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        hw = tuple(image_size)
    else:
        raise DDKitError(f"image_size={image_size!r} is not valid; give an int or (height, width)")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in hw):
        raise DDKitError(f"image_size={image_size!r} is not valid; sides must be integers >= 1")
    return hw  # type: ignore[return-value]


def _check_range(name: str, value: object, positive: bool) -> tuple[float, float]:
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    if ok:
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            lo, hi = math.nan, math.nan
        ok = lo <= hi and (lo > 0 if positive else lo >= 0) and math.isfinite(hi)
    if not ok:
        raise DDKitError(
            f"{name}={value!r} is not valid; give (low, high) with 0 {'<' if positive else '<='} "
            f"low <= high"
        )
    return lo, hi


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise DDKitError(
            f"generator must be a torch.Generator, got {type(generator).__name__}; pass "
            "torch.Generator().manual_seed(seed)"
        )
    return generator


def sample_crops(
    n: int,
    image_size: int | tuple[int, int],
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    per_sample: bool = True,
    flip_prob: float = 0.5,
) -> CropParams:
    """Draw RandomResizedCrop boxes (and horizontal flips) for a batch of ``n`` images.

    The rule of torchvision's ``RandomResizedCrop``, vectorised over samples: each of 10 attempts
    draws an area ``U(scale) * H * W`` and an aspect ratio ``exp(U(log ratio))``, giving
    ``w = round(sqrt(area * aspect))``, ``h = round(sqrt(area / aspect))``; the first attempt with
    ``0 < h <= H`` and ``0 < w <= W`` is taken, with ``top ~ U{0..H-h}``, ``left ~ U{0..W-w}``.
    If none fits, the centre crop of the largest box whose aspect ratio lies in ``ratio``.
    All 10 attempts are always drawn, so the generator advances by the same amount whatever is
    accepted (the draw order is: area, log-ratio ``[m, 10]`` each, then top, left, flip ``[m]``,
    with ``m = n`` or 1).

    Args:
        n: batch size (>= 1).
        image_size: ``H`` (square) or ``(H, W)`` of the input images, in pixels.
        generator: the source of every random draw; its device is where the draws are made.
        scale: ``(low, high)`` fraction of the image area, ``0 < low <= high``; CDA varies ``low``
            with :func:`cda_min_scale`.
        ratio: ``(low, high)`` width / height aspect range.
        per_sample: True: one box and flip per image (``len == n``); False: one box and flip for
            the whole batch (``len == 1``; SRe2L's default, as torchvision on a batch tensor).
        flip_prob: probability of a horizontal flip (0 disables flips).

    Returns:
        :class:`CropParams` with tensors on the generator's device.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DDKitError(f"n={n!r} is not valid; give the batch size as an integer >= 1")
    height, width = _image_hw(image_size)
    generator = _check_generator(generator)
    s_lo, s_hi = _check_range("scale", scale, positive=True)
    r_lo, r_hi = _check_range("ratio", ratio, positive=True)
    if isinstance(flip_prob, bool) or not isinstance(flip_prob, (int, float)) or not (
        0.0 <= flip_prob <= 1.0
    ):
        raise DDKitError(f"flip_prob={flip_prob!r} is not valid; give a probability in [0, 1]")
    m = n if per_sample else 1
    dev = generator.device
    kw = dict(generator=generator, device=dev, dtype=torch.float64)

    area = height * width * (s_lo + (s_hi - s_lo) * torch.rand(m, _CROP_TRIES, **kw))
    log_lo, log_hi = math.log(r_lo), math.log(r_hi)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(m, _CROP_TRIES, **kw))
    w_try = torch.round(torch.sqrt(area * aspect))
    h_try = torch.round(torch.sqrt(area / aspect))
    fits = (w_try > 0) & (w_try <= width) & (h_try > 0) & (h_try <= height)
    first = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)  # first True (0 if none)
    any_fit = fits.any(dim=1)

    # fallback: centre crop of the whole image, trimmed to the aspect range
    in_ratio = width / height
    if in_ratio < r_lo:
        fb_w, fb_h = width, int(round(width / r_lo))
    elif in_ratio > r_hi:
        fb_w, fb_h = int(round(height * r_hi)), height
    else:
        fb_w, fb_h = width, height
    fb_hw = torch.tensor([fb_h, fb_w], dtype=torch.float64, device=dev)
    h = torch.where(any_fit, h_try.gather(1, first).squeeze(1), fb_hw[0])
    w = torch.where(any_fit, w_try.gather(1, first).squeeze(1), fb_hw[1])

    u_top = torch.rand(m, **kw)
    u_left = torch.rand(m, **kw)
    # floor(U * k) is uniform on {0..k-1}; clamp guards against U rounding up to 1.0
    top = torch.minimum(torch.floor(u_top * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u_left * (width - w + 1)), width - w)
    top = torch.where(any_fit, top, torch.full_like(top, (height - fb_h) // 2))
    left = torch.where(any_fit, left, torch.full_like(left, (width - fb_w) // 2))
    flip = torch.rand(m, generator=generator, device=dev) < float(flip_prob)
    as_int = lambda t: t.to(torch.int64)  # noqa: E731
    return CropParams(as_int(top), as_int(left), as_int(h), as_int(w), flip, (height, width))


def _out_hw(out_size: int | tuple[int, int]) -> tuple[int, int]:
    try:
        return _image_hw(out_size)
    except DDKitError:
        raise DDKitError(
            f"out_size={out_size!r} is not valid; give an int or (height, width) >= 1"
        ) from None


def apply_crops(
    x: torch.Tensor, params: CropParams, out_size: int | tuple[int, int]
) -> torch.Tensor:
    """Cut the boxes of ``params`` out of ``x`` and resize them to ``out_size`` (then flip).

    One ``F.affine_grid`` + ``F.grid_sample`` call (bilinear, ``align_corners=False``) for the
    whole batch, no loop over samples. Output pixel centres are spread evenly over the box and the
    sampling points are clamped to the box's pixel centres, so each output equals cutting the box
    out first and resizing it with ``F.interpolate(mode="bilinear", align_corners=False,
    antialias=False)``: the full box at the input size reproduces the input, and no pixel outside
    the box leaks in. No antialiasing when shrinking (torchvision's tensor resize antialiases by
    default; crops resized back to the input size only ever enlarge, where the two agree).
    Differentiable with respect to ``x``.

    Args:
        x: images ``[N, C, H, W]`` (floating point), ``(H, W) == params.image_size``.
        params: from :func:`sample_crops`, with ``len(params)`` equal to ``N`` or 1 (shared).
        out_size: output side ``S`` or ``(h, w)`` in pixels.

    Returns:
        ``[N, C, h, w]`` crops on ``x``'s device and dtype.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DDKitError(f"apply_crops expects float images [N, C, H, W], got {got}")
    n_img, channels, height, width = x.shape
    if (height, width) != tuple(params.image_size):
        raise DDKitError(
            f"crop parameters were drawn for {params.image_size[0]}x{params.image_size[1]} images, "
            f"got {height}x{width}; sample the crops with the images' size"
        )
    if len(params) not in (1, n_img):
        raise DDKitError(
            f"{len(params)} crop(s) for a batch of {n_img}; draw n={n_img} crops or one shared crop"
        )
    out_h, out_w = _out_hw(out_size)
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    as_f = lambda t: t.to(device=x.device, dtype=dtype)  # noqa: E731
    top, left, h, w = as_f(params.top), as_f(params.left), as_f(params.height), as_f(params.width)
    sign = 1.0 - 2.0 * as_f(params.flip)
    # normalised coordinates (align_corners=False): pixel edge e maps to 2 e / size - 1
    sx = sign * w / width
    sy = h / height
    cx = (2.0 * left + w) / width - 1.0
    cy = (2.0 * top + h) / height - 1.0
    zero = torch.zeros_like(sx)
    theta = torch.stack(
        (torch.stack((sx, zero, cx), dim=1), torch.stack((zero, sy, cy), dim=1)), dim=1
    )  # [n, 2, 3]
    theta = theta.expand(n_img, 2, 3)
    grid = F.affine_grid(theta, [n_img, channels, out_h, out_w], align_corners=False)
    # keep the samples on the box's own pixel centres: bilinear taps near the box edge then
    # replicate the edge pixel instead of reading outside the box (crop first, then resize)
    lo = torch.stack(((2.0 * left + 1.0) / width, (2.0 * top + 1.0) / height), dim=1) - 1.0
    hi = torch.stack(((2.0 * (left + w) - 1.0) / width, (2.0 * (top + h) - 1.0) / height), 1) - 1.0
    grid = torch.minimum(torch.maximum(grid, lo.view(-1, 1, 1, 2)), hi.view(-1, 1, 1, 2))
    src = x if x.dtype == dtype else x.to(dtype)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def random_resized_crop(
    x: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    per_sample: bool = False,
    flip_prob: float = 0.5,
    out_size: int | tuple[int, int] | None = None,
) -> tuple[torch.Tensor, CropParams]:
    """:func:`sample_crops` then :func:`apply_crops` on ``x`` ``[N, C, H, W]``.

    ``out_size`` defaults to the input size. Returns ``(crops [N, C, h, w], params)`` so the
    caller can store the draw. ``per_sample`` defaults to False (SRe2L: one crop per batch).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise DDKitError("random_resized_crop expects images [N, C, H, W]; pass a 4-d batch")
    hw = (int(x.shape[2]), int(x.shape[3]))
    params = sample_crops(int(x.shape[0]), hw, generator, scale, ratio, per_sample, flip_prob)
    return apply_crops(x, params, hw if out_size is None else out_size), params


def padding_for(image_size: int) -> int:
    """The padding of G-VBSM's ``RandomCrop(size, padding)``: 4 px at 32 px (CIFAR), 8 px at 64 px
    (Tiny-ImageNet), i.e. ``ceil(size / 8)`` (4 at 28 px, 1 at 8 px)."""
    return max(1, -(-int(image_size) // 8))


def sample_padded_crops(
    n: int,
    image_size: int | tuple[int, int],
    generator: torch.Generator,
    padding: int,
    per_sample: bool = True,
    flip_prob: float = 0.5,
) -> CropParams:
    """Draw torchvision's ``RandomCrop(size, padding)`` (then horizontal flips) for ``n`` images.

    The image is padded by ``padding`` pixels on every side and an ``H x W`` window is cut at a
    uniform offset, so the box is ``top, left`` uniform on ``{-padding..padding}`` (relative to
    the unpadded image) with ``height, width = H, W``: rows outside the image are padding. Draw
    order: top, left, flip ``[m]`` uniforms, ``m = n`` or 1.

    Args:
        n: batch size (>= 1).
        image_size: ``H`` or ``(H, W)`` in pixels.
        generator: the source of every draw; its device is where the draws are made.
        padding: pixels of padding (>= 0; :func:`padding_for` gives G-VBSM's).
        per_sample: one box and flip per image, or one for the whole batch (torchvision on a batch
            tensor, as G-VBSM's recover does).
        flip_prob: probability of a horizontal flip.

    Returns:
        :class:`CropParams` for :func:`apply_padded_crops`.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DDKitError(f"n={n!r} is not valid; give the batch size as an integer >= 1")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise DDKitError(f"padding={padding!r} is not valid; give an integer >= 0 (pixels)")
    height, width = _image_hw(image_size)
    generator = _check_generator(generator)
    if isinstance(flip_prob, bool) or not isinstance(flip_prob, (int, float)) or not 0.0 <= flip_prob <= 1.0:
        raise DDKitError(f"flip_prob={flip_prob!r} is not valid; give a probability in [0, 1]")
    m = n if per_sample else 1
    dev = generator.device
    kw = dict(generator=generator, device=dev, dtype=torch.float64)
    span = 2 * padding + 1
    top = torch.clamp(torch.floor(torch.rand(m, **kw) * span), max=span - 1) - padding
    left = torch.clamp(torch.floor(torch.rand(m, **kw) * span), max=span - 1) - padding
    flip = torch.rand(m, generator=generator, device=dev) < float(flip_prob)
    full = lambda size: torch.full((m,), size, dtype=torch.int64, device=dev)  # noqa: E731
    return CropParams(top.to(torch.int64), left.to(torch.int64), full(height), full(width), flip, (height, width))


def apply_padded_crops(x: torch.Tensor, params: CropParams, fill=0.0) -> torch.Tensor:
    """Cut the windows of :func:`sample_padded_crops` out of ``x`` padded with ``fill``, then flip.

    Output pixel ``(r, c)`` of sample ``i`` is ``x[i, :, r + top_i, c + left_i]`` where that lies
    inside the image, else ``fill``: torchvision's ``RandomCrop(size, padding, fill)``. One
    gather per axis for the whole batch; exact (no interpolation) and differentiable with
    respect to ``x``.

    Args:
        x: images ``[N, C, H, W]`` (floating point), ``(H, W) == params.image_size``.
        params: windows with ``height, width == H, W``; ``len(params)`` is ``N`` or 1 (shared).
        fill: the padding value in ``x``'s units: a number, or one value per channel (``[C]``).
            G-VBSM pads its normalised synthetic batch with 0; torchvision pads a real image
            before normalising, i.e. with the normalised value of a black pixel.

    Returns:
        ``[N, C, H, W]`` on ``x``'s device and dtype.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DDKitError(f"apply_padded_crops expects float images [N, C, H, W], got {got}")
    n_img, channels, height, width = x.shape
    if (height, width) != tuple(params.image_size) or bool((params.height != height).any()) or bool(
            (params.width != width).any()):
        raise DDKitError(
            f"padded crops of {params.image_size[0]}x{params.image_size[1]} windows do not fit {height}x{width} images; "
            "sample them with the images' size"
        )
    if len(params) not in (1, n_img):
        raise DDKitError(f"{len(params)} crop(s) for a batch of {n_img}; draw n={n_img} crops or one shared crop")
    top, left = params.top.to(x.device), params.left.to(x.device)
    pad = int(max(top.abs().max(), left.abs().max()))
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    if fill_t.shape[1] not in (1, channels):
        raise DDKitError(f"fill has {fill_t.shape[1]} values for {channels} channels; give one number or one per channel")
    rows = (torch.arange(height, device=x.device) + pad + top.view(-1, 1)).expand(n_img, height)
    cols = (torch.arange(width, device=x.device) + pad + left.view(-1, 1)).expand(n_img, width)

    def window(t: torch.Tensor, value: float) -> torch.Tensor:
        """``t`` ``[N, c, H, W]`` padded with ``value``, each sample's window cut out."""
        t = F.pad(t, (pad, pad, pad, pad), value=value) if pad else t
        n, c = t.shape[:2]
        t = t.gather(2, rows.view(n_img, 1, height, 1).expand(n, c, height, t.shape[3]))
        return t.gather(3, cols.view(n_img, 1, 1, width).expand(n, c, height, width))

    # zeros outside the image, plus fill times an indicator of the outside: exact on both sides
    outside = window(torch.zeros(n_img, 1, height, width, dtype=x.dtype, device=x.device), 1.0)
    return apply_flips(window(x, 0.0) + outside * fill_t, params.flip)


#: crops of :func:`augment_batch`: torchvision's RandomResizedCrop, its padded RandomCrop, or none
CROP_KINDS = ("resized", "padded", "none")


def augment_batch(
    x: torch.Tensor,
    generator: torch.Generator,
    crop: str = "resized",
    flip_prob: float = 0.5,
    per_sample: bool = True,
    scale: tuple[float, float] = (0.08, 1.0),
    padding: int = 4,
    fill=0.0,
    jitter: int = 0,
    jitter_mode: str = "positive",
) -> torch.Tensor:
    """Crop + horizontal flip, then a cyclic roll: the augmentations of the statistics family.

    ``crop="resized"``: RandomResizedCrop with ``scale`` back to the input size
    (:func:`sample_crops`, :func:`apply_crops`); ``"padded"``: RandomCrop with ``padding`` and
    ``fill`` (:func:`sample_padded_crops`, :func:`apply_padded_crops`); ``"none"``: the flip
    alone. One draw per image (``per_sample``, a data loader's transform) or one for the batch
    (torchvision on a batch tensor, as the recover loops do). Then, for ``jitter > 0``, one roll
    of the batch (:func:`sample_jitter`). Every draw comes from ``generator``.

    Args:
        x: images ``[N, C, H, W]`` (floating point, normalised).

    Returns:
        ``[N, C, H, W]``, differentiable with respect to ``x``.
    """
    if crop not in CROP_KINDS:
        raise DDKitError(f"crop={crop!r} is not valid; choose one of: {', '.join(CROP_KINDS)}")
    size = (int(x.shape[-2]), int(x.shape[-1]))
    n = int(x.shape[0])
    if crop == "resized":
        x = apply_crops(x, sample_crops(n, size, generator, scale=scale, per_sample=per_sample,
                                        flip_prob=flip_prob), size)
    elif crop == "padded":
        x = apply_padded_crops(x, sample_padded_crops(n, size, generator, padding, per_sample, flip_prob), fill)
    elif flip_prob > 0:
        x = apply_flips(x, sample_flips(n if per_sample else 1, generator, flip_prob))
    if jitter > 0:
        x = apply_jitter(x, sample_jitter(jitter, generator, jitter_mode))
    return x


def sample_flips(n: int, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Bool ``[n]`` on the generator's device: True with probability ``p`` (flip that sample)."""
    generator = _check_generator(generator)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DDKitError(f"n={n!r} is not valid; give an integer >= 1")
    if not 0.0 <= float(p) <= 1.0:
        raise DDKitError(f"p={p!r} is not valid; give a flip probability in [0, 1]")
    return torch.rand(n, generator=generator, device=generator.device) < float(p)


def apply_flips(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the samples of ``x`` ``[N, C, H, W]`` where ``flip`` (bool ``[N]`` or
    ``[1]``) is True; a new tensor, differentiable with respect to ``x``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise DDKitError("apply_flips expects images [N, C, H, W]; pass a 4-d batch")
    flip = flip.to(device=x.device, dtype=torch.bool).reshape(-1)
    if flip.numel() not in (1, x.shape[0]):
        raise DDKitError(f"{flip.numel()} flip flags for a batch of {x.shape[0]}; give N or 1")
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def random_flip(
    x: torch.Tensor, generator: torch.Generator, p: float = 0.5, per_sample: bool = True
) -> torch.Tensor:
    """Mirror left-right each sample of ``x`` ``[N, C, H, W]`` with probability ``p``
    (``per_sample=False``: one draw for the whole batch). Draws ``[N]`` (or ``[1]``) uniforms."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise DDKitError("random_flip expects images [N, C, H, W]; pass a 4-d batch")
    return apply_flips(x, sample_flips(int(x.shape[0]) if per_sample else 1, generator, p))


#: ranges of :func:`sample_jitter`: ``positive`` is ``{0..J}`` (SRe2L on ImageNet and CIFAR-100,
#: CDA, G-VBSM), ``symmetric`` ``{-J..J}`` (SRe2L on Tiny-ImageNet)
JITTER_MODES = ("positive", "symmetric")


def sample_jitter(max_shift: int, generator: torch.Generator, mode: str = "symmetric") -> tuple[int, int]:
    """A random cyclic shift ``(dy, dx)`` in pixels, each uniform on ``{-max_shift..max_shift}``
    (``mode="symmetric"``) or ``{0..max_shift}`` (``mode="positive"``, the published code's
    ``random.randint(0, J)``).

    One ``torch.randint`` of two values (``dy`` first). ``max_shift=0`` draws nothing and returns
    ``(0, 0)``.
    """
    generator = _check_generator(generator)
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise DDKitError(f"max_shift={max_shift!r} is not valid; give an integer >= 0 (pixels)")
    if mode not in JITTER_MODES:
        raise DDKitError(f"jitter mode {mode!r} is not valid; choose one of: {', '.join(JITTER_MODES)}")
    if max_shift == 0:
        return 0, 0
    low = 0 if mode == "positive" else -max_shift
    dy, dx = torch.randint(
        low, max_shift + 1, (2,), generator=generator, device=generator.device
    ).tolist()
    return int(dy), int(dx)


def apply_jitter(x: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """``torch.roll(x, shift, dims=(2, 3))``: content moves ``dy`` rows down and ``dx`` columns
    right, wrapping around. ``x`` is ``[N, C, H, W]``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise DDKitError("apply_jitter expects images [N, C, H, W]; pass a 4-d batch")
    dy, dx = (int(s) for s in shift)
    if dy == 0 and dx == 0:
        return x
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def jitter_roll(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """SRe2L's jitter: roll ``x`` ``[N, C, H, W]`` cyclically by one random ``(dy, dx)`` with
    each coordinate uniform on ``{-max_shift..max_shift}`` pixels, shared over the batch.
    Equivalent to ``apply_jitter(x, sample_jitter(max_shift, generator))``."""
    return apply_jitter(x, sample_jitter(max_shift, generator))


def cda_min_scale(t: int, total: int, milestone: float = 1.0, mode: str = "cosine") -> float:
    """CDA's lower RandomResizedCrop scale bound at iteration ``t`` of ``total`` (Yin & Shen, "Dataset
    Distillation via Curriculum Data Augmentation").

    With ``E = milestone * total`` and ``t < E``: ``step`` gives 1.0; ``linear`` gives
    ``0.08 + 0.92 * (1 - t / E)``; ``cosine`` gives ``0.08 + 0.92 * (1 + cos(pi * t / E)) / 2``.
    For ``t >= E`` every mode gives 0.08. Use the crop ``scale=(cda_min_scale(...), 1.0)``.

    Args:
        t: iteration index, ``0 <= t`` (values past ``total`` give 0.08).
        total: number of iterations ``T`` (>= 1).
        milestone: ``M`` in ``[0, 1]``, the fraction of ``T`` after which the scale stays at 0.08.
        mode: ``cosine`` (CDA's default), ``linear`` or ``step``.

    Returns:
        the lower scale bound, a float in ``[0.08, 1]``.
    """
    if not isinstance(mode, str) or mode not in CDA_MODES:
        raise DDKitError(f"CDA mode={mode!r} is not valid; choose one of: {', '.join(CDA_MODES)}")
    if (
        isinstance(milestone, bool)
        or not isinstance(milestone, (int, float))
        or not 0.0 <= milestone <= 1.0
    ):
        raise DDKitError(f"CDA milestone={milestone!r} is not valid; give a fraction in [0, 1]")
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise DDKitError(f"CDA total={total!r} is not valid; give the iteration count (>= 1)")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0:
        raise DDKitError(f"CDA t={t!r} is not valid; give an iteration index >= 0")
    end = milestone * total
    if t >= end:
        return CDA_FLOOR
    span = 1.0 - CDA_FLOOR
    if mode == "step":
        return 1.0
    if mode == "linear":
        return CDA_FLOOR + span * (1.0 - t / end)
    return CDA_FLOOR + span * (1.0 + math.cos(math.pi * t / end)) / 2.0
