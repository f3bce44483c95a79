"""ddkit.evaluate: evaluation protocols and baselines."""

from ddkit.evaluate.baselines import check_ipc, random_subset, sample_real_per_class
from ddkit.evaluate.protocols import (
    ARCHITECTURES, HARD_PRESETS, PROTOCOLS, EvalResult, build_model, evaluate, resolve_config, test_accuracy,
    train_classifier,
)
from ddkit.evaluate.soft import SOFT_PRESETS, SOFT_RECIPES, soft_loss, train_soft

__all__ = [
    "check_ipc", "random_subset", "sample_real_per_class", "ARCHITECTURES", "HARD_PRESETS", "PROTOCOLS",
    "EvalResult", "build_model", "evaluate", "resolve_config", "test_accuracy", "train_classifier",
    "SOFT_PRESETS", "SOFT_RECIPES", "soft_loss", "train_soft",
]
