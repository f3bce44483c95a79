"""ddkit.losses layer: pure loss functions on class-grouped feature tensors.

All inputs are laid out ``[K, N, ...]`` (class, sample, features); every function returns a 0-dim
tensor differentiable w.r.t. the synthetic inputs. See :mod:`ddkit.losses.matching`.

The matching engine's named terms (which taps, which weight) are registered in
:mod:`ddkit.methods.terms`.
"""

from ddkit.losses.matching import (
    check_grouped,
    class_aware_ce_loss,
    class_centralization_loss,
    feature_mean,
    gram_loss,
    icd_neighbours,
    intra_class_kl_loss,
    local_covariance_loss,
    mean_feature_loss,
    moment_loss,
)
from ddkit.losses.statistics import (
    ConvStatistics,
    bn_matching_loss,
    bn_statistics,
    bn_statistics_distance,
    cell_statistics,
    conv_statistics,
    conv_statistics_distance,
    densification_loss,
    first_layer_weights,
    ema_statistic,
    patch_statistics,
    statistic_distance,
)

__all__ = [
    "check_grouped",
    "class_aware_ce_loss",
    "class_centralization_loss",
    "feature_mean",
    "gram_loss",
    "icd_neighbours",
    "intra_class_kl_loss",
    "local_covariance_loss",
    "mean_feature_loss",
    "moment_loss",
    "ConvStatistics",
    "bn_matching_loss",
    "bn_statistics",
    "bn_statistics_distance",
    "cell_statistics",
    "conv_statistics",
    "conv_statistics_distance",
    "densification_loss",
    "first_layer_weights",
    "ema_statistic",
    "patch_statistics",
    "statistic_distance",
]
