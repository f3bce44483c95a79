"""Distribution-matching losses (DM, IDM, IID, DDM families) as pure tensor functions.

Layout convention
-----------------
Every input is GROUPED BY CLASS: a leading class dimension ``K``, then the sample dimension ``N``,
then the feature dimensions, e.g. real ``[K, Nr, D]`` and synthetic ``[K, Ns, D]``, or feature maps
``[K, N, C, H, W]``. The matching engine runs one batched forward pass for all classes and reshapes
its output to this layout; the losses never see a network.

Every function returns a 0-dim tensor that is differentiable with respect to the synthetic inputs.
Real inputs are constants: they are detached here (so no graph is kept for them even if the caller
forgot) and cast to the synthetic tensor's dtype. Real and synthetic tensors must live on the same
device.

Reductions are stated in each docstring; the general rule is SUM over classes (as in the DM paper's
per-class sum) and MEAN over layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ddkit.errors import DDKitError

__all__ = [
    "check_grouped",
    "feature_mean",
    "mean_feature_loss",
    "moment_loss",
    "gram_loss",
    "local_covariance_loss",
    "class_centralization_loss",
    "intra_class_kl_loss",
    "icd_neighbours",
    "class_aware_ce_loss",
    "moment_per_class_layer",
    "gram_per_class_layer",
    "style_weights",
]

# exp form of the class centralization loss: exponents above this are continued linearly (see the
# function's docstring). exp(50) ~ 5e21 is far inside float32's range (max ~3.4e38).
_CC_EXP_CAP = 50.0


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_tensor(t: object, name: str, min_dim: int, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise DDKitError(
            f"{name} must be a torch.Tensor laid out {layout}, got {type(t).__name__}; "
            "pass the features as a tensor grouped by class"
        )
    if t.dim() < min_dim:
        raise DDKitError(
            f"{name} has shape {_shape(t)} but needs at least {min_dim} dims laid out {layout}; "
            "group the features by class (leading class dim K, then samples N)"
        )
    if not t.is_floating_point():
        raise DDKitError(
            f"{name} has dtype {t.dtype} but losses need floating-point features; "
            "convert it with .float()"
        )
    if t.shape[1] < 1:
        raise DDKitError(f"{name} has shape {_shape(t)} with no samples per class; pass N >= 1")
    return t


def check_grouped(
    real: torch.Tensor,
    syn: torch.Tensor,
    min_dim: int = 3,
    layout: str = "[K, N, ...]",
) -> None:
    """Validate that ``real`` and ``syn`` are class-grouped tensors that can be matched.

    Shapes: ``real [K, Nr, *F]``, ``syn [K, Ns, *F]`` with the same class count ``K`` and the same
    trailing feature shape ``F``; ``Nr`` and ``Ns`` may differ. ``min_dim`` is the least number of
    dims each must have (3 for vectors ``[K, N, D]``, 4 for maps ``[K, N, C, P...]``); ``layout``
    only words the error message.

    Raises :class:`ddkit.errors.DDKitError` with a one-line message on: a non-tensor, too few dims,
    a non-floating dtype, an empty sample dim, different class counts, different feature shapes,
    or different devices.
    """
    _check_tensor(real, "real features", min_dim, layout)
    _check_tensor(syn, "synthetic features", min_dim, layout)
    if real.shape[0] != syn.shape[0]:
        raise DDKitError(
            f"class counts differ: real features {_shape(real)} have K={real.shape[0]} classes, "
            f"synthetic {_shape(syn)} have K={syn.shape[0]}; group both by the same classes"
        )
    if real.shape[2:] != syn.shape[2:]:
        raise DDKitError(
            f"feature shapes differ: real {_shape(real)} vs synthetic {_shape(syn)} after [K, N]; "
            "take both from the same layer of the same network"
        )
    if real.device != syn.device:
        raise DDKitError(
            f"real features are on {real.device} but synthetic ones on {syn.device}; "
            "move both to the same device"
        )


def _prep_real(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """Real features are constants: drop their graph and match the synthetic dtype."""
    return real.detach().to(dtype=syn.dtype)


def _as_layers(maps: object, name: str) -> list[torch.Tensor]:
    if isinstance(maps, torch.Tensor):  # one layer given bare; iterating it would split classes
        return [maps]
    if not isinstance(maps, Sequence):
        raise DDKitError(
            f"{name} must be a list of per-layer feature maps [K, N, C, H, W], "
            f"got {type(maps).__name__}"
        )
    return list(maps)


def _paired_layers(real_maps: object, syn_maps: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    real_list = _as_layers(real_maps, "real_maps")
    syn_list = _as_layers(syn_maps, "syn_maps")
    if len(real_list) != len(syn_list):
        raise DDKitError(
            f"got {len(real_list)} real layers but {len(syn_list)} synthetic layers; "
            "pass the same layers for both"
        )
    if not real_list:
        raise DDKitError("no feature-map layers given; pass at least one [K, N, C, H, W] tensor")
    pairs = []
    for i, (r, s) in enumerate(zip(real_list, syn_list)):
        try:
            check_grouped(r, s, min_dim=4, layout="[K, N, C, H, W]")
        except DDKitError as err:
            raise DDKitError(f"layer {i}: {err}") from None
        pairs.append((_prep_real(r, s).flatten(3), s.flatten(3)))  # -> [K, N, C, P]
    return pairs


def _zero_on_graph(t: torch.Tensor) -> torch.Tensor:
    """An exact 0-dim zero that is connected to ``t``'s graph (gradient 0, never NaN)."""
    return t.reshape(-1)[:0].sum()


def feature_mean(x: torch.Tensor) -> torch.Tensor:
    """Per-class mean over samples: ``[K, N, ...] -> [K, prod(...)]``."""
    return x.flatten(2).mean(dim=1)


# --------------------------------------------------------------------------------------------------
# DM: mean embedding
# --------------------------------------------------------------------------------------------------


def mean_feature_loss(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """Distribution Matching (DM) mean-embedding loss.

    Shapes: ``real [K, Nr, D]``, ``syn [K, Ns, D]``; any trailing dims ``[K, N, ...]`` are flattened
    to ``D``.

    Formula::

        L = sum_c || mean_n real[c, n] - mean_n syn[c, n] ||_2^2

    i.e. a sum of squares over feature dims and a SUM over classes (no averaging). The gradient with
    respect to one synthetic sample is ``2 (mean_syn_c - mean_real_c) / Ns``.

    Returns a 0-dim tensor.
    """
    check_grouped(real, syn)
    real = _prep_real(real, syn)
    diff = feature_mean(real) - feature_mean(syn)
    return diff.pow(2).sum()


# --------------------------------------------------------------------------------------------------
# DDM: per-channel style moments and Gram correlations
# --------------------------------------------------------------------------------------------------


def style_weights(class_ids: Sequence[int], num_classes: int, layers: int, legacy_accumulator: bool = False,
                  device=None, dtype=torch.float64) -> torch.Tensor:
    """Weight of each class's layer-summed style value ``sum_l s(c, l)`` in the style total.

    ``[len(class_ids)]`` tensor. The intended reduction (DDM paper, Malakshan et al., WACV 2025) is
    the mean over layers and the sum over classes, so every weight is ``1 / layers``.

    ``legacy_accumulator=True`` reproduces the published DDM scripts, which create the style
    accumulator once before the class loop and never reset it: for classes in the order
    ``0 .. K-1`` they set ``acc <- (acc + sum_l s(c, l)) / layers`` and add ``acc`` to the loss.
    Unrolled, class ``c`` (global index among ``num_classes``) then counts with weight
    ``sum_{m=1}^{K-c} layers^-m``: ``1 / layers`` for the last class, approaching
    ``1 / (layers - 1)`` for the first (1.5x the intended weight with 3 layers). The value and the
    gradient of that sum are exactly the script's, and the weight depends only on the class's
    global index, so it is the same in batched, per-class and class-split runs.
    """
    if not legacy_accumulator:
        return torch.full((len(class_ids),), 1.0 / layers, dtype=dtype, device=device)
    weights = [sum(float(layers) ** -m for m in range(1, num_classes - int(c) + 1)) for c in class_ids]
    return torch.tensor(weights, dtype=dtype, device=device)


def _reduce_style(per_class_layer: torch.Tensor, class_ids, num_classes, legacy_accumulator: bool) -> torch.Tensor:
    """``[K, L]`` per-class, per-layer style values -> the weighted total (see :func:`style_weights`)."""
    k, layers = per_class_layer.shape
    ids = list(range(k)) if class_ids is None else list(class_ids)
    if len(ids) != k:
        raise DDKitError(f"class_ids names {len(ids)} classes but the features hold {k}; pass one id per class")
    total_classes = k if num_classes is None else int(num_classes)
    weights = style_weights(ids, total_classes, layers, legacy_accumulator, per_class_layer.device,
                            per_class_layer.dtype)
    return (per_class_layer.sum(dim=1) * weights).sum()


def moment_per_class_layer(
    real_maps: Sequence[torch.Tensor] | torch.Tensor,
    syn_maps: Sequence[torch.Tensor] | torch.Tensor,
    eps: float = 1e-5,
    unbiased: bool = True,
) -> torch.Tensor:
    """DDM's moment (mean/std) style value of every class and layer: ``[K, L]``.

    Shapes: ``real_maps`` and ``syn_maps`` are sequences (one entry per layer) of
    ``[K, Nr, C, H, W]`` and ``[K, Ns, C, H, W]`` tensors (spatial dims are flattened into
    ``P = H*W``); a bare tensor counts as a single layer.

    Per layer ``l`` and class ``c`` (Malakshan et al., "Decomposed Distribution Matching in Dataset
    Condensation", WACV 2025):

    1. average the maps over the batch: ``A_c = mean_n X[c, n]`` -> ``[C, P]``;
    2. per channel ``j``: ``mu_cj = mean_p A_c[j, p]`` and ``sigma_cj = sqrt(var_p A_c[j, p] + eps)``;
       ``unbiased=True`` divides the variance by ``P - 1`` as the authors' ``calc_mean_std`` does
       (``torch.var``'s default), ``False`` by ``P``;
    3. ``s(c, l) = ( mean_j (mu_syn - mu_real)^2 + mean_j (sigma_syn - sigma_real)^2 ) / 2``.
    """
    if not (math.isfinite(eps) and eps >= 0):
        raise DDKitError(f"eps must be a finite number >= 0, got {eps}")
    columns = []
    for real, syn in _paired_layers(real_maps, syn_maps):
        stats = []
        for x in (real, syn):
            avg = x.mean(dim=1)  # [K, C, P]
            mu = avg.mean(dim=2)  # [K, C]
            sigma = torch.sqrt(avg.var(dim=2, unbiased=unbiased) + eps)  # [K, C]
            stats.append((mu, sigma))
        (mu_r, sd_r), (mu_s, sd_s) = stats
        columns.append(0.5 * ((mu_s - mu_r).pow(2).mean(dim=1) + (sd_s - sd_r).pow(2).mean(dim=1)))
    return torch.stack(columns, dim=1)


def moment_loss(
    real_maps: Sequence[torch.Tensor] | torch.Tensor,
    syn_maps: Sequence[torch.Tensor] | torch.Tensor,
    eps: float = 1e-5,
    unbiased: bool = True,
    legacy_accumulator: bool = False,
    class_ids: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Style (first and second moment) matching of feature maps, DDM's ``L_MM``.

    Shapes as in :func:`moment_per_class_layer`. Result (0-dim tensor): the mean over layers of
    ``s(c, l)``, SUMMED over classes. ``legacy_accumulator``, ``class_ids`` (the global index of
    each of the ``K`` classes, default ``0..K-1``) and ``num_classes`` (default ``K``) select the
    authors' never-reset accumulator instead; see :func:`style_weights`.
    """
    per_class_layer = moment_per_class_layer(real_maps, syn_maps, eps=eps, unbiased=unbiased)
    return _reduce_style(per_class_layer, class_ids, num_classes, legacy_accumulator)


def _mean_gram(x: torch.Tensor) -> torch.Tensor:
    """``[K, N, C, P] -> [K, C, C]``: per-sample ``F F^T / (C P)`` averaged over the batch."""
    _, n, c, p = x.shape
    return torch.einsum("knip,knjp->kij", x, x) / (n * c * p)


def gram_per_class_layer(
    real_maps: Sequence[torch.Tensor] | torch.Tensor,
    syn_maps: Sequence[torch.Tensor] | torch.Tensor,
) -> torch.Tensor:
    """DDM's Gram (correlation) style value of every class and layer: ``[K, L]``.

    Shapes: sequences (one per layer) of ``[K, Nr, C, H, W]`` and ``[K, Ns, C, H, W]`` tensors
    (spatial dims flattened to ``P = H*W``); a bare tensor counts as one layer. For each sample with
    ``F = X[c, n]`` as a ``[C, P]`` matrix::

        G(F)    = F F^T / (C * P)                                 # [C, C]
        Gbar_c  = mean_n G(X[c, n])                               # batch average per class
        s(c, l) = sum of squares of (Gbar_c^syn - Gbar_c^real)     # MSELoss with sum reduction
    """
    columns = [(_mean_gram(syn) - _mean_gram(real)).pow(2).sum(dim=(1, 2))
               for real, syn in _paired_layers(real_maps, syn_maps)]
    return torch.stack(columns, dim=1)


def gram_loss(
    real_maps: Sequence[torch.Tensor] | torch.Tensor,
    syn_maps: Sequence[torch.Tensor] | torch.Tensor,
    legacy_accumulator: bool = False,
    class_ids: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Gram (channel correlation) matching of feature maps, DDM's optional ``L_CM``.

    Result (0-dim tensor): the mean over layers of :func:`gram_per_class_layer`, SUMMED over
    classes; ``legacy_accumulator`` etc. as in :func:`moment_loss` (the authors' Gram script has the
    same never-reset accumulator).
    """
    return _reduce_style(gram_per_class_layer(real_maps, syn_maps), class_ids, num_classes, legacy_accumulator)


# --------------------------------------------------------------------------------------------------
# IID: local covariance matching and class centralization
# --------------------------------------------------------------------------------------------------


def _local_cov(x: torch.Tensor) -> torch.Tensor:
    """``[K, N, C, P] -> [K, C, C]``: ``(1/N) sum_n F_n F_n^T`` with ``F_n`` centred per class."""
    centred = x - x.mean(dim=1, keepdim=True)
    return torch.einsum("knip,knjp->kij", centred, centred) / x.shape[1]


def local_covariance_loss(real_fmap: torch.Tensor, syn_fmap: torch.Tensor) -> torch.Tensor:
    """IID covariance matching on local (pre-pooling) feature maps.

    Shapes: ``real_fmap [K, Nr, C, H, W]`` or ``[K, Nr, C, P]``; ``syn_fmap [K, Ns, C, ...]`` alike.
    Spatial dims are flattened to ``P`` positions, so each sample is a ``C x P`` matrix whose
    columns are ``P`` local ``C``-dim feature vectors.

    Per class ``c`` (``X_n`` the ``C x P`` matrix of sample ``n``)::

        F_n     = X_n - mean_m X_m                 # centre per (channel, position) within class c
        Sigma_c = (1/N) sum_n F_n F_n^T            # C x C
        L       = sum_c || Sigma_c^real - Sigma_c^syn ||_F^2

    SUM over classes, no normalisation by ``P`` or ``C``. Adding any per-(channel, position)
    constant to a whole class batch leaves ``L`` unchanged. Returns a 0-dim tensor.
    """
    check_grouped(real_fmap, syn_fmap, min_dim=4, layout="[K, N, C, H, W] or [K, N, C, P]")
    real = _prep_real(real_fmap, syn_fmap).flatten(3)
    syn = syn_fmap.flatten(3)
    return (_local_cov(real) - _local_cov(syn)).pow(2).sum()


def class_centralization_loss(
    emb: torch.Tensor,
    form: str = "square",
    beta: float = 0.0,
    temperature: float = 0.02,
) -> torch.Tensor:
    """IID class centralization constraint: pull each synthetic embedding to its class centre.

    Shape: ``emb [K, Ns, D]`` (trailing dims flattened), the synthetic images' embeddings from a
    (pretrained) network. With ``mu_c = mean_j emb[c, j]`` (differentiable; it includes sample
    ``i``) and ``d2_ci = || emb[c, i] - mu_c ||_2^2``:

    ``form="square"`` (default)::

        L = sum_c sum_i max(d2_ci - beta, 0)         # beta = 0 (default): plain sum of squares

    ``form="exp"``::

        L = sum_c sum_i max(exp(temperature * d2_ci) - beta, 0)

    SUM over samples and classes in both forms.

    Where the exp form comes from: Deng et al., "Exploiting Inter-sample and Inter-feature
    Relations in Dataset Distillation", CVPR 2024 (arXiv:2404.00563). The paper's equation text was
    not retrievable here, so the formula follows the authors' public code (github.com/VincenDen/IID,
    ``DM+ours/main_DM_IID.py``). A commented-out block there exponentiates each sample's squared
    distance to the class mean with coefficient 0.02 (our ``temperature`` default), then zeroes the
    term when it is below the threshold, written out for beta = 0 (``if value < 0: value = 0``). For
    beta > 0 that line can be read two ways: as the hinge ``max(exp - beta, 0)`` or as a hard cut
    ``exp * [exp >= beta]``. We use the hinge because it is continuous in the inputs. At beta = 0
    the two agree, and so does the code. The authors' comment also says the plain squared distance
    with beta = 0 gives the same results, and their active code uses it (times 0.05, which here
    belongs in the caller's term weight). That is why ``"square"`` is the default.
    Since ``exp(.) >= 1``, beta only matters in the exp form when ``beta > 1``: then samples with
    ``d2 < ln(beta) / temperature`` contribute nothing, a dead zone around the centre. In the
    square form, beta is that dead zone directly, in squared-distance units.

    Overflow guard (exp form): for exponents ``z = temperature * d2`` above 50, ``exp(z)`` is
    continued by its tangent ``exp(50) * (1 + z - 50)``. The loss stays finite, continuous and
    C^1, and the far samples keep a nonzero pull. Below the cap the formula is exact.

    Returns a 0-dim tensor. When all samples of a class coincide, the square form is exactly 0.
    """
    _check_tensor(emb, "embeddings", 3, "[K, Ns, D]")
    if form not in ("square", "exp"):
        raise DDKitError(f"unknown class centralization form {form!r}; use 'square' or 'exp'")
    if not (math.isfinite(beta) and beta >= 0):
        raise DDKitError(f"beta must be a finite number >= 0, got {beta}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise DDKitError(f"temperature must be a finite number > 0, got {temperature}")
    x = emb.flatten(2)
    d2 = (x - x.mean(dim=1, keepdim=True)).pow(2).sum(dim=2)  # [K, Ns]
    if form == "square":
        per = d2 - beta if beta > 0 else d2
    else:
        z = temperature * d2
        capped = z.clamp(max=_CC_EXP_CAP)
        per = torch.exp(capped) * (1.0 + (z - capped)) - beta
    if beta > 0:
        per = per.clamp(min=0.0)
    return per.sum()


# --------------------------------------------------------------------------------------------------
# IDM: class-aware cross-entropy
# --------------------------------------------------------------------------------------------------


def class_aware_ce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    accuracy: float,
    misclassified_only: bool = False,
) -> torch.Tensor:
    """IDM's class-aware regularisation (Zhao et al., "Improved Distribution Matching for Dataset
    Condensation", CVPR 2023): cross-entropy of a queued network on the synthetic images, scaled by
    that network's running training accuracy.

    Shapes: ``logits [K, N, num_outputs]`` (the network's logits on class ``c``'s ``N`` expanded,
    augmented synthetic images), ``labels [K]`` (the class id of each group).

    ``L = accuracy * sum_c mean_n CE(logits[c, n], labels[c])``: MEAN over a class's images, SUM over
    classes, as the authors' per-class loop adds one class's term at a time. The authors pass the
    accuracy in PERCENT (0..100, a torchnet ``ClassErrorMeter``), so with their weights 0.5 / 0.1 the
    effective multiplier is about 10 to 50; the engine's ``ce_accuracy_scale`` says which unit it
    passes.

    ``misclassified_only``: the authors' branch for IPC 1 without the partition (``N == 1``): a
    class counts only if the argmax of its one logit row is not its label. Returns a 0-dim tensor.
    """
    _check_tensor(logits, "logits", 3, "[K, N, num_outputs]")
    k, n, outputs = logits.shape
    if labels.shape != (k,):
        raise DDKitError(f"labels must hold one class id per group, shape [{k}], got {_shape(labels)}")
    per_sample = F.cross_entropy(logits.reshape(k * n, outputs), labels.repeat_interleave(n), reduction="none")
    per_class = per_sample.reshape(k, n).mean(dim=1)
    if misclassified_only:
        if n != 1:
            raise DDKitError(f"misclassified_only needs one image per class (IPC 1, no partition), got {n}")
        with torch.no_grad():
            wrong = (logits[:, 0].argmax(dim=1) != labels).to(per_class.dtype)
        per_class = per_class * wrong
    return per_class.sum() * float(accuracy)


# --------------------------------------------------------------------------------------------------
# DDM: intra-class diversity (negative KL to the k-nearest-neighbour mean)
# --------------------------------------------------------------------------------------------------


def icd_neighbours(ipc: int) -> int:
    """Number of same-class neighbours for the intra-class diversity term at ``ipc`` images/class.

    ``k = round(0.2 * ipc)`` clipped to ``[1, ipc - 1]`` (halves round up). For ``ipc < 2`` there is
    no other sample to compare with and this returns 0, meaning "skip the term".
    Examples: 1 -> 0, 2 -> 1, 10 -> 2, 50 -> 10.
    """
    if isinstance(ipc, bool) or not isinstance(ipc, int):
        raise DDKitError(f"ipc must be an int, got {type(ipc).__name__}")
    if ipc < 1:
        raise DDKitError(f"ipc must be >= 1, got {ipc}")
    if ipc < 2:
        return 0
    k = int(math.floor(0.2 * ipc + 0.5))
    return max(1, min(k, ipc - 1))


def intra_class_kl_loss(
    emb: torch.Tensor,
    k: int | None = None,
    max_kl: float = 5.0,
) -> torch.Tensor:
    """DDM intra-class diversity: push each synthetic embedding away from its class neighbours.

    Shape: ``emb [K, Ns, D]`` (trailing dims flattened to ``D``).

    For each sample ``e_i`` of class ``c``:

    * ``N_i`` = its ``k`` nearest other samples of class ``c`` by Euclidean distance (itself
      excluded). They are chosen without gradient, so the selection is a constant.
    * ``m_i = (1/k) sum_{j in N_i} e_j``. This mean is differentiable, so the neighbours get
      gradient too.
    * ``p_i = softmax(e_i)``, ``q_i = softmax(m_i)`` over the ``D`` feature dims, and
      ``KL_i = sum_d p_i[d] (log p_i[d] - log q_i[d])``, computed with ``log_softmax``. That way
      large inputs (even 1e4) never give NaN or inf.

    Loss (MEAN over the samples of a class, SUM over classes, as the authors' script adds each
    class's value inside its class loop)::

        L = sum_c mean_i -min(KL_ci, max_kl)

    ``k`` defaults to ``icd_neighbours(Ns)``. When ``Ns < 2`` the loss is an exact zero that is
    still attached to ``emb``'s graph, so its gradient is zero.

    Guard: ``-KL`` is unbounded below. Scaling the logits up drives it to ``-inf`` without adding
    any useful diversity. So each sample's KL is clamped at ``max_kl`` and the loss lies in
    ``[-K * max_kl, 0]``. Once a sample's KL passes ``max_kl`` its gradient is exactly zero, and the
    matching terms take over. Default 5 nats. ``KL = E_p[log p/q]``, so at 5 nats the sample's own
    feature profile is on average ``e^5 ~ 150`` times more likely under ``p`` than under its
    neighbourhood's ``q``. That is already "clearly different samples". It sits below the ``log D``
    scale (6.2 for D = 512, 7.6 for D = 2048), which is KL(one-hot || uniform): past that scale, further gains mostly come from sharpening the softmax by inflating
    activations, not from real diversity. The cap also bounds this term's share of the total
    loss for a given weight.
    """
    _check_tensor(emb, "embeddings", 3, "[K, Ns, D]")
    if not (isinstance(max_kl, (int, float)) and math.isfinite(max_kl) and max_kl > 0):
        raise DDKitError(f"max_kl must be a finite number > 0, got {max_kl}")
    x = emb.flatten(2)
    n = x.shape[1]
    if n < 2:
        return _zero_on_graph(emb)
    if k is None:
        k = icd_neighbours(n)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n - 1:
        raise DDKitError(
            f"k={k!r} neighbours is invalid for {n} samples per class; use an int in [1, {n - 1}] "
            "or None for the default"
        )
    with torch.no_grad():
        dist = torch.cdist(x.detach(), x.detach())  # [K, N, N]
        dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        idx = dist.topk(k, dim=2, largest=False).indices  # [K, N, k]
        weights = torch.zeros_like(dist).scatter_(2, idx, 1.0 / k)  # rows average the neighbours
    m = torch.bmm(weights, x)  # [K, N, D]
    log_p = F.log_softmax(x, dim=2)
    log_q = F.log_softmax(m, dim=2)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=2)  # [K, N]
    return -kl.clamp(max=max_kl).mean(dim=1).sum()
