"""ddkit.augment: differentiable siamese augmentation (DSA).

``DSA`` samples one augmentation family per call from a strategy string and applies it,
either with one shared draw (siamese, for matching real and synthetic batches) or with
per-sample parameters (for training evaluation networks). See :mod:`ddkit.augment.dsa`.
"""

from .crops import (
    CDA_MODES,
    JITTER_MODES,
    CropParams,
    apply_crops,
    apply_flips,
    apply_jitter,
    apply_padded_crops,
    augment_batch,
    cda_min_scale,
    jitter_roll,
    random_flip,
    padding_for,
    random_resized_crop,
    sample_crops,
    sample_flips,
    sample_jitter,
    sample_padded_crops,
)
from .replay import MIX_MODES, ReplayPlan, replay_inputs, sample_replay_plan
from .dsa import (
    DEFAULT_STRATEGY,
    DIGITS_STRATEGY,
    DSA,
    FAMILIES,
    DSAParams,
    dsa_strategy_for,
)

__all__ = [
    "DSA",
    "DSAParams",
    "dsa_strategy_for",
    "FAMILIES",
    "DEFAULT_STRATEGY",
    "DIGITS_STRATEGY",
    "CDA_MODES",
    "JITTER_MODES",
    "CropParams",
    "apply_crops",
    "apply_padded_crops",
    "augment_batch",
    "padding_for",
    "sample_padded_crops",
    "apply_flips",
    "apply_jitter",
    "cda_min_scale",
    "jitter_roll",
    "random_flip",
    "random_resized_crop",
    "sample_crops",
    "sample_flips",
    "sample_jitter",
    "MIX_MODES",
    "ReplayPlan",
    "replay_inputs",
    "sample_replay_plan",
]
