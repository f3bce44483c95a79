"""Statistics-matching losses (SRe2L, CDA, G-VBSM) as pure tensor functions.

The recover step of these methods optimises synthetic images so that the batch statistics they
induce inside a frozen teacher match the statistics of the real data:

* SRe2L / CDA: at the input of every BatchNorm layer, the batch mean and (biased) variance per
  channel against the layer's running mean / running variance (:func:`bn_statistics`,
  :func:`bn_matching_loss`).
* G-VBSM adds, at the input of every Conv2d, the channel mean / variance and a mean / variance
  per patch position pooled over the batch and the channels (:func:`patch_statistics`,
  :func:`conv_statistics`, :func:`conv_statistics_distance`), an EMA form of the synthetic
  statistic (:func:`ema_statistic`), and a per-class eigenvalue "densification" term
  (:func:`densification_loss`). ddkit's former per-channel cell statistics stay available
  (:func:`cell_statistics`).

No network lives here: the recover engine collects the feature maps with hooks and passes the
tensors in. Targets (running statistics, cached real statistics) are constants: they are detached
and cast to the synthetic tensor's device and dtype. Every loss returns a 0-dim tensor that is
differentiable with respect to the synthetic statistics.

Distances (``norm``): ``"l2"`` is the plain Euclidean norm ``||a - b||_2`` of the flattened
difference (the papers' choice), ``"l2sq"`` its square, ``"mse"`` the mean of the squared
entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ddkit.errors import DDKitError

__all__ = [
    "NORMS",
    "PATCH_FORMS",
    "EMA_STARTS",
    "DENSIFY_REDUCTIONS",
    "ConvStatistics",
    "bn_statistics",
    "statistic_distance",
    "bn_statistics_distance",
    "first_layer_weights",
    "bn_matching_loss",
    "patch_statistics",
    "cell_statistics",
    "conv_statistics",
    "conv_statistics_distance",
    "ema_statistic",
    "densification_loss",
]

#: distances accepted by the ``norm`` arguments
NORMS = ("l2", "l2sq", "mse")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_map(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = _shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DDKitError(
            f"{name} must be a float feature map [N, C, H, W], got {got}; pass the layer input"
        )
    if x.shape[0] * x.shape[2] * x.shape[3] == 0:
        raise DDKitError(
            f"{name} {_shape(x)} is empty; statistics need at least one value per channel"
        )
    return x


def _check_norm(norm: object) -> str:
    if not isinstance(norm, str) or norm not in NORMS:
        raise DDKitError(f"norm={norm!r} is not valid; choose one of: {', '.join(NORMS)}")
    return norm


def _as_target(target: object, like: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise DDKitError(f"{what} must be a tensor, got {type(target).__name__}")
    if target.shape != like.shape:
        raise DDKitError(
            f"{what} has shape {_shape(target)} but the synthetic statistic is {_shape(like)}; "
            "pair each layer's statistics with the same layer's targets"
        )
    return target.detach().to(device=like.device, dtype=like.dtype)


# --------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------


def bn_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance of a BatchNorm input.

    Args:
        x: feature map ``[N, C, H, W]`` (the BN layer's input; any units).

    Returns:
        ``(mean [C], var [C])`` over the N, H, W axes; ``var`` divides by ``N * H * W`` (biased,
        what BatchNorm normalises with in training mode). Differentiable with respect to ``x``.
    """
    x = _check_map(x, "bn_statistics input")
    if x.device.type == "cpu" and x.is_contiguous() and x.dtype in (torch.float32, torch.float64):
        return _two_pass_channel_statistics(x)
    return _var_mean_channel_statistics(x)


def _var_mean_channel_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bn_statistics` by ``torch.var_mean`` over dims (0, 2, 3): any layout, device and dtype."""
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return mean, var


def _two_pass_channel_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bn_statistics` for a standard-layout CPU map: the mean, then the sum of squares of the
    centred rows of its ``[N, C, H*W]`` view. The same two-pass arithmetic as ``torch.var_mean``
    (no E[x^2] - E[x]^2 cancellation), but PyTorch's CPU reduction over dims (0, 2, 3) walks
    the map with a stride; these row reductions run 3.0x (128 channels) to 3.9x (64 channels)
    faster, forward and backward, on maps of 100 images (docs/speed.md). float32 and float64
    only: a bf16 or fp16 map keeps ``var_mean``, which accumulates in float32."""
    n, c = x.shape[0], x.shape[1]
    rows = x.reshape(n, c, -1)
    count = rows.shape[0] * rows.shape[2]
    mean = rows.sum(dim=2).sum(dim=0) / count
    centred = rows - mean[:, None]
    var = torch.linalg.vecdot(centred, centred, dim=2).sum(dim=0) / count
    return mean, var


def statistic_distance(
    value: torch.Tensor, target: torch.Tensor, norm: str = "l2"
) -> torch.Tensor:
    """Distance between a synthetic statistic and its (constant) target, any equal shapes.

    ``"l2"``: ``||value - target||_2`` over all entries; ``"l2sq"``: its square; ``"mse"``: mean of
    the squared entries. ``target`` is detached. Returns a 0-dim tensor. (The ``l2`` gradient
    at a zero difference is 0, not NaN.)
    """
    norm = _check_norm(norm)
    if not isinstance(value, torch.Tensor):
        raise DDKitError(f"statistic must be a tensor, got {type(value).__name__}")
    diff = (value - _as_target(target, value, "target")).reshape(-1)
    if norm == "l2":
        return torch.linalg.vector_norm(diff)
    if norm == "l2sq":
        return diff.pow(2).sum()
    return diff.pow(2).mean()


def bn_statistics_distance(
    mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, norm: str = "l2"
) -> torch.Tensor:
    """One BatchNorm hook's distance ``r = d(var, running_var) + d(mean, running_mean)`` (SRe2L,
    CDA and G-VBSM), ``d`` the :func:`statistic_distance` of ``norm`` (``"l2"``: plain, not
    squared, L2 as in the papers). ``mean``, ``var`` ``[C]``; the running statistics are
    detached. Returns a 0-dim tensor."""
    return statistic_distance(var, running_var, norm) + statistic_distance(mean, running_mean, norm)


def first_layer_weights(count: int, first_multiplier: float = 10.0) -> list[float]:
    """The weights of ``count`` hooked layers in module order: ``first_multiplier`` for the first
    (SRe2L's first BatchNorm; G-VBSM's first hooked module, its stem Conv2d), 1 for the rest."""
    return [float(first_multiplier)] + [1.0] * (count - 1) if count else []


def bn_matching_loss(
    stats: Sequence[tuple[torch.Tensor, torch.Tensor]],
    targets: Sequence[tuple[torch.Tensor, torch.Tensor]],
    first_multiplier: float = 10.0,
    norm: str = "l2",
) -> torch.Tensor:
    """SRe2L's BatchNorm statistics loss (Yin et al., "Squeeze, Recover and Relabel", 2023).

    ``sum_l w_l * (d(var_l, rv_l) + d(mu_l, rm_l))`` (:func:`bn_statistics_distance`) with
    ``w_0 = first_multiplier``, ``w_l = 1`` otherwise (:func:`first_layer_weights`). SUM over
    layers (not mean), so the loss grows with depth; the recover engine scales it with ``r_bn``.

    Args:
        stats: per BN layer, in network order, ``(mean [C_l], var [C_l])`` of the synthetic batch
            (e.g. from :func:`bn_statistics`, or EMA values from :func:`ema_statistic`).
        targets: per BN layer ``(running_mean [C_l], running_var [C_l])``; detached.
        first_multiplier: weight of the first layer (10 in SRe2L / CDA).
        norm: ``"l2"`` | ``"l2sq"`` | ``"mse"``.

    Returns:
        0-dim tensor.
    """
    norm = _check_norm(norm)
    stats, targets = list(stats), list(targets)
    if not stats:
        raise DDKitError(
            "bn_matching_loss got no layers; the teacher has no BatchNorm2d layer to match"
        )
    if len(stats) != len(targets):
        raise DDKitError(
            f"bn_matching_loss got {len(stats)} layer statistics but {len(targets)} targets; "
            "give one (running_mean, running_var) per hooked BN layer"
        )
    weights = first_layer_weights(len(stats), first_multiplier)
    terms = [w * bn_statistics_distance(mean, var, r_mean, r_var, norm)
             for w, (mean, var), (r_mean, r_var) in zip(weights, stats, targets)]
    return torch.stack(terms).sum()


#: forms of the Conv2d-input patch statistics (:func:`conv_statistics`)
PATCH_FORMS = ("reference", "cells")


def _check_positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DDKitError(f"{what}={value!r} is not valid; give an integer >= 1")
    return value


def patch_statistics(x: torch.Tensor, patch_size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """G-VBSM's patch statistics of a Conv2d input, as the published code computes them.

    The map is resized bilinearly (``align_corners=False``, no antialiasing) so that each side is
    rounded UP to a multiple of ``patch_size`` (a side that already is one is left as it is: 14 px
    becomes 16, 7 becomes 8, 2 becomes 4), then cut into non-overlapping ``patch_size`` x
    ``patch_size``-PIXEL patches. Patch ``p`` (row-major over the grid of patches) pools all
    ``N * C * patch_size**2`` values of that patch over the batch AND the channels.

    Args:
        x: feature map ``[N, C, H, W]``.
        patch_size: patch side in pixels (4 on CIFAR / Tiny-ImageNet, 16 on ImageNet in G-VBSM).

    Returns:
        ``(mean [P], var [P])`` with ``P = ceil(H / p) * ceil(W / p)`` (64 for a 32 px map, 49 for
        28 px, 16 for 14 px, 4 for 7 px, 1 for 4 px or less), whatever the channel count; ``var``
        is biased (divides by ``N * C * p**2``). Differentiable with respect to ``x``.
    """
    x = _check_map(x, "patch_statistics input")
    p = _check_positive_int(patch_size, "patch_size")
    n, c, h, w = x.shape
    rows, cols = -(-h // p), -(-w // p)
    if (rows * p, cols * p) != (h, w):
        x = F.interpolate(x, size=(rows * p, cols * p), mode="bilinear", align_corners=False)
    patches = x.reshape(n, c, rows, p, cols, p)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return _patch_rows_statistics(patches)
    return _var_mean_patch_statistics(patches)


def _var_mean_patch_statistics(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`patch_statistics` of ``patches`` ``[N, C, rows, p, cols, p]`` by ``torch.var_mean``
    over dims (0, 1, 3, 5): any device and dtype."""
    var, mean = torch.var_mean(patches, dim=(0, 1, 3, 5), correction=0)
    return mean.reshape(-1), var.reshape(-1)


def _patch_rows_statistics(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`patch_statistics` of ``patches`` ``[N, C, rows, p, cols, p]`` on the CPU: one row per
    patch (a copy), then :func:`bn_statistics`' two passes over the rows; 3.4x to 3.6x faster than
    ``var_mean`` over dims (0, 1, 3, 5), forward and backward, on maps of 100 images
    (docs/speed.md). float32 and float64."""
    rows, cols = patches.shape[2], patches.shape[4]
    by_patch = patches.permute(2, 4, 0, 1, 3, 5).reshape(1, rows * cols, -1, 1)
    return _two_pass_channel_statistics(by_patch)


def cell_statistics(x: torch.Tensor, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel and spatial cell (ddkit's ``patch_form=cells``).

    Not G-VBSM's statistic (that is :func:`patch_statistics`): the ``H x W`` map is cut into a
    ``cells x cells`` grid of ``(H / cells) x (W / cells)`` cells and each cell of each CHANNEL
    gets its own mean and variance over the N samples and the cell's pixels. Cell ``(i, j)``
    covers rows ``[i * H / cells, (i + 1) * H / cells)`` and the same for columns.

    Args:
        x: feature map ``[N, C, H, W]``, ``H`` and ``W`` multiples of ``cells``.
        cells: cells per side (>= 1).

    Returns:
        ``(mean [C, cells, cells], var [C, cells, cells])``; ``var`` divides by
        ``N * H * W / cells**2``. ``cells=1`` equals :func:`bn_statistics` reshaped.

    Raises:
        DDKitError: ``cells`` not a positive int, or not dividing ``H`` and ``W``.
    """
    x = _check_map(x, "cell_statistics input")
    if isinstance(cells, bool) or not isinstance(cells, int) or cells < 1:
        raise DDKitError(f"cells={cells!r} is not valid; give the number of cells per side (>= 1)")
    n, c, h, w = x.shape
    if h % cells or w % cells:
        raise DDKitError(
            f"cell size {h}/{cells} x {w}/{cells} does not fit the feature map {h}x{w} (cells="
            f"{cells} must divide both sides); pick cells dividing both sides or skip this "
            f"layer's cell statistics"
        )
    ph, pw = h // cells, w // cells
    # [N, C, cells, ph, cells, pw] -> statistics over N, ph, pw
    v = x.reshape(n, c, cells, ph, cells, pw)
    var, mean = torch.var_mean(v, dim=(0, 3, 5), correction=0)
    return mean, var


class ConvStatistics(NamedTuple):
    """G-VBSM statistics of one Conv2d input ``[N, C, H, W]``.

    ``mean``, ``var``: ``[C]`` (as :func:`bn_statistics`); ``patch_mean``, ``patch_var``: ``[P]``
    (:func:`patch_statistics`, the reference form) or ``[C, cells, cells]``
    (:func:`cell_statistics`), or None when this layer has no patch statistics. Replace fields
    (``s._replace(mean=...)``) to feed EMA values to the loss.
    """

    mean: torch.Tensor
    var: torch.Tensor
    patch_mean: torch.Tensor | None = None
    patch_var: torch.Tensor | None = None


def conv_statistics(x: torch.Tensor, patch: int | None = None, form: str = "reference") -> ConvStatistics:
    """Channel statistics and, if ``patch`` is given, patch statistics of ``x`` ``[N, C, H, W]``.

    ``form="reference"``: ``patch`` is the patch side in pixels (:func:`patch_statistics`);
    ``form="cells"``: ``patch`` is the number of cells per side (:func:`cell_statistics`).
    Returns a :class:`ConvStatistics` (``patch_*`` None when ``patch`` is None).
    """
    if form not in PATCH_FORMS:
        raise DDKitError(f"patch form {form!r} is not valid; choose one of: {', '.join(PATCH_FORMS)}")
    mean, var = bn_statistics(x)
    if patch is None:
        return ConvStatistics(mean, var)
    p_mean, p_var = (patch_statistics if form == "reference" else cell_statistics)(x, patch)
    return ConvStatistics(mean, var, p_mean, p_var)


def conv_statistics_distance(stats: ConvStatistics, target: ConvStatistics, norm: str = "l2") -> torch.Tensor:
    """One Conv2d hook's distance ``r`` in G-VBSM:
    ``d(var, t_var) + d(mean, t_mean) [+ d(patch_mean, t_patch_mean) + d(patch_var, t_patch_var)]``
    with ``d`` the :func:`statistic_distance` of ``norm``; the patch terms count when both the
    statistic and the target have them. Returns a 0-dim tensor."""
    total = statistic_distance(stats.var, target.var, norm) + statistic_distance(stats.mean, target.mean, norm)
    if stats.patch_mean is not None and target.patch_mean is not None:
        total = total + statistic_distance(stats.patch_mean, target.patch_mean, norm)
    if stats.patch_var is not None and target.patch_var is not None:
        total = total + statistic_distance(stats.patch_var, target.patch_var, norm)
    return total


#: how an EMA of :func:`ema_statistic` starts
EMA_STARTS = ("statistic", "zero")


def ema_statistic(
    current: torch.Tensor, ema: torch.Tensor | None, alpha: float, start: str = "statistic"
) -> tuple[torch.Tensor, torch.Tensor]:
    """G-VBSM's EMA ("score distillation") form of a synthetic statistic ``s`` (Shao et al.,
    "Generalized Large-Scale Data Condensation via Various Backbone and Statistical Matching",
    CVPR 2024).

    ``ema_new = alpha * ema + (1 - alpha) * sg(s)`` (no gradient) and ``value = ema_new + s -
    sg(s)``: its forward value is ``ema_new`` while its gradient is that of ``s`` alone (``d value
    / d s = I``). Feed ``value`` to the distance, so ``r = ||target - value||`` is evaluated at the
    EMA but pushes the current batch; keep ``ema_new`` for the next call.

    The first call (``ema`` None) starts the EMA at ``start``: ``"statistic"`` (what the published
    code means: ``ema_new = sg(s)``) or ``"zero"`` (what it computes: its hooks start the EMA at
    the float 0.0 and test for an int, so ``ema_new = (1 - alpha) * sg(s)``).

    Args:
        current: the statistic ``s`` of the current batch, any shape (e.g. ``[C]``).
        ema: the previous EMA (same shape), or None.
        alpha: EMA decay in ``[0, 1]`` (0.8 on small sets, 0.4 on ImageNet).
        start: ``"statistic"`` or ``"zero"``.

    Returns:
        ``(value, ema_new)``: ``value`` differentiable like ``current``; ``ema_new`` detached.
    """
    if not isinstance(current, torch.Tensor):
        raise DDKitError(f"ema_statistic needs a tensor statistic, got {type(current).__name__}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise DDKitError(f"alpha={alpha!r} is not valid; give an EMA decay in [0, 1]")
    if start not in EMA_STARTS:
        raise DDKitError(f"EMA start {start!r} is not valid; choose one of: {', '.join(EMA_STARTS)}")
    s = current.detach()
    if ema is None:
        ema_new = s if start == "statistic" else (1.0 - alpha) * s
    else:
        prev = _as_target(ema, current, "ema")
        ema_new = alpha * prev + (1.0 - alpha) * s
    return ema_new + (current - s), ema_new


#: how :func:`densification_loss` reduces its per-class terms
DENSIFY_REDUCTIONS = ("sum", "mean")


def densification_loss(
    images: torch.Tensor,
    labels: torch.Tensor,
    pool_size: int = 32,
    temperature: float = 4.0,
    normalize: bool = False,
    reduction: str = "sum",
) -> torch.Tensor:
    """G-VBSM's data-densification term: spread each class's images over more directions (Shao
    et al., CVPR 2024).

    For every class ``c`` in the batch: ``Z_c`` = its images adaptively average-pooled to
    ``pool_size x pool_size`` (pooled UP for smaller images, which repeats pixels) and flattened,
    ``[n_c, C * pool_size**2]``; ``lambda`` = the eigenvalues of the Gram matrix ``Z_c Z_c^T``
    ``[n_c, n_c]``; the class term is ``KL(sg(softmax(lambda / temperature)) ||
    softmax(lambda))`` = ``sum sg(t) * (log sg(t) - log_softmax(lambda))``. The tempered target
    is DETACHED, as in the published code: the gradient moves ``lambda`` toward the flatter
    spectrum, i.e. raises the rank of the class's images (without the detach it points the other
    way once a class is nearly collinear). A class with one image contributes 0.

    The published code feeds the AUGMENTED batch (after crop, flip and roll) and SUMS over the
    classes of the batch (``reduction="sum"``). ``normalize=True`` with ``reduction="mean"`` is
    ddkit's former form (``densify_form=unit``): each pooled, flattened image scaled to unit L2
    norm first, so ``Z Z^T`` is a cosine-similarity matrix with eigenvalues in ``[0, n_c]``
    whatever the image scale.

    Scale caveat of the published form: the eigenvalues are in squared image units summed over
    ``C * pool_size**2`` values, so the term is informative only while their gaps are O(1); for
    unit-variance 3 x 32 x 32 images ``lambda`` runs to thousands, both softmaxes are one-hot and
    the term and its gradient are about 0.

    Args:
        images: images ``[B, C, H, W]`` (normalised units), the batch the teacher sees.
        labels: int class labels ``[B]``.
        pool_size: side of the pooled images (32 in G-VBSM).
        temperature: softmax temperature ``tau`` of the target distribution (4).
        normalize: L2-normalise each pooled, flattened image before the Gram matrix.
        reduction: ``"sum"`` or ``"mean"`` over the classes present.

    Returns:
        0-dim tensor in ``images``' dtype (computed in float32 at least), differentiable with
        respect to ``images``.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = _shape(images) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DDKitError(f"densification_loss expects float images [B, C, H, W], got {got}")
    if (
        not isinstance(labels, torch.Tensor)
        or labels.dim() != 1
        or labels.shape[0] != images.shape[0]
        or labels.is_floating_point()
    ):
        got = _shape(labels) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise DDKitError(
            f"densification_loss expects integer labels [{images.shape[0]}], got {got}; "
            "pass one class index per image"
        )
    _check_positive_int(pool_size, "pool_size")
    if not float(temperature) > 0:
        raise DDKitError(f"temperature={temperature!r} is not valid; give a positive number")
    if reduction not in DENSIFY_REDUCTIONS:
        raise DDKitError(f"reduction={reduction!r} is not valid; choose one of: {', '.join(DENSIFY_REDUCTIONS)}")
    x = images if images.dtype in (torch.float32, torch.float64) else images.float()
    z_all = F.adaptive_avg_pool2d(x, pool_size).flatten(1)  # [B, D]
    if normalize:
        z_all = F.normalize(z_all, dim=1)
    labels = labels.to(z_all.device)
    terms = []
    for c in torch.unique(labels).tolist():
        z = z_all[labels == c]  # [n_c, D]
        lam = torch.linalg.eigvalsh(z @ z.T)  # [n_c]; the order does not matter
        target = F.softmax(lam.detach() / float(temperature), dim=0)
        terms.append((torch.xlogy(target, target) - target * F.log_softmax(lam, dim=0)).sum())
    total = torch.stack(terms)
    total = total.sum() if reduction == "sum" else total.mean()
    return total.to(images.dtype)
