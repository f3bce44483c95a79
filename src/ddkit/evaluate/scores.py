"""DD-Ranking's scores of a distilled set, relative to references measured under the same protocol.

Raw accuracy hides how much of a set's score comes from the teacher's soft labels and from the
evaluation's augmentation. DD-Ranking (Li et al. 2025, "DD-Ranking: Rethinking the Evaluation of
Dataset Distillation", and its code) scores a set against references trained the same way:

* **HLR**, hard-label recovery: ``acc(full data, hard) - acc(set, hard)``, in points. How far the
  set's images, with hard labels, stay below the whole training set; lower is better.
* **IOR**, improvement over random: ``acc(set, its protocol) - acc(random subset, same protocol
  and teacher)``, in points: what the images add over random real images given the same labels
  (for a soft-label set, ``random+M``: the random subset relabelled by the same teachers).
* **LRS**, label-robust score: ``100 * (exp(a) - exp(-1)) / (exp(1) - exp(-1))`` with
  ``a = w * IOR - (1 - w) * HLR`` on accuracies as fractions (IOR and HLR divided by 100) and
  ``w = 0.5``, DD-Ranking's default. ``a`` lies in [-1, 1], so LRS lies in [0, 100]; a set as good
  as the full data with hard labels and no better than random scores ``100 * (1 - e^-1) /
  (e - e^-1) = 26.9``.
* **ARS**, augmentation-robust score: the same normalisation of ``b = w * G_aug + (1 - w) *
  G_plain``, where ``G_aug`` is IOR with the evaluation's augmentation and ``G_plain`` the same gap
  with it switched off (fractions, ``w = 0.5``).

All accuracies here are percentages (0..100), as everywhere in ddkit.
"""

from __future__ import annotations

import math

#: DD-Ranking's default weights of IOR in LRS and of the augmented gap in ARS.
LRS_WEIGHT = 0.5
ARS_WEIGHT = 0.5
SCORE_NAMES = ("HLR", "IOR", "LRS", "ARS")
#: One line per score, for tables and reports.
LEGEND = {
    "HLR": "hard-label recovery: full-data hard-label accuracy minus the set's (points; lower is better)",
    "IOR": "improvement over random: the set's accuracy minus the random subset's under the same protocol and "
           "teacher (points; higher is better)",
    "LRS": "label-robust score: HLR and IOR combined as DD-Ranking does (0..100; higher is better)",
    "ARS": "augmentation-robust score: IOR with and without evaluation augmentation combined (0..100; higher is "
           "better)",
}


def _normalised(value: float) -> float:
    """DD-Ranking's map of ``value`` in [-1, 1] to [0, 100]: ``100 (e^v - e^-1) / (e - e^-1)``."""
    return 100.0 * (math.exp(value) - math.exp(-1.0)) / (math.exp(1.0) - math.exp(-1.0))


def hard_label_recovery(full_data_hard: float, set_hard: float) -> float:
    """HLR in points: full-data hard-label accuracy minus the set's hard-label accuracy (both %)."""
    return float(full_data_hard) - float(set_hard)


def improvement_over_random(set_accuracy: float, random_accuracy: float) -> float:
    """IOR in points: the set's accuracy minus the random subset's, under one protocol (both %)."""
    return float(set_accuracy) - float(random_accuracy)


def label_robust_score(hlr: float, ior: float, weight: float = LRS_WEIGHT) -> float:
    """LRS in [0, 100] from HLR and IOR (points): ``a = weight * IOR/100 - (1 - weight) * HLR/100``."""
    return _normalised(weight * ior / 100.0 - (1.0 - weight) * hlr / 100.0)


def augmentation_robust_score(gap_augmented: float, gap_plain: float, weight: float = ARS_WEIGHT) -> float:
    """ARS in [0, 100] from the set-minus-random gaps (points) with and without evaluation augmentation."""
    return _normalised(weight * gap_augmented / 100.0 + (1.0 - weight) * gap_plain / 100.0)


def set_scores(set_accuracy: float | None, random_accuracy: float | None, set_hard: float | None = None,
               full_data_hard: float | None = None, set_plain: float | None = None,
               random_plain: float | None = None) -> dict[str, float]:
    """Every score the given accuracies (%) allow, by name (:data:`SCORE_NAMES`); a score whose
    inputs are missing (None) is left out.

    Args:
        set_accuracy, random_accuracy: the set and its random subset under the set's protocol.
        set_hard: the set under the hard-label protocol (its own accuracy for a hard-label set).
        full_data_hard: the whole training set under the hard-label protocol (the reference).
        set_plain, random_plain: both under the set's protocol with evaluation augmentation off.
    """
    scores = {}
    if set_hard is not None and full_data_hard is not None:
        scores["HLR"] = hard_label_recovery(full_data_hard, set_hard)
    if set_accuracy is not None and random_accuracy is not None:
        scores["IOR"] = improvement_over_random(set_accuracy, random_accuracy)
    if "HLR" in scores and "IOR" in scores:
        scores["LRS"] = label_robust_score(scores["HLR"], scores["IOR"])
    if "IOR" in scores and set_plain is not None and random_plain is not None:
        scores["ARS"] = augmentation_robust_score(scores["IOR"], improvement_over_random(set_plain, random_plain))
    return {name: round(value, 4) for name, value in scores.items()}
