"""DD-Ranking's scores (HLR, IOR, LRS, ARS) against hand-computed examples, and the cached
full-data reference they are measured against."""

import json
import math

import pytest

from ddkit.errors import DDKitError
from ddkit.evaluate import references
from ddkit.evaluate.scores import (
    augmentation_robust_score, hard_label_recovery, improvement_over_random, label_robust_score, set_scores,
)


def test_scores_match_a_hand_computed_example():
    # full data 90 % and the set 60 % with hard labels; the set 80 % and its random subset 70 % under
    # the set's protocol; 50 % and 45 % with the evaluation's augmentation off.
    assert hard_label_recovery(90.0, 60.0) == 30.0
    assert improvement_over_random(80.0, 70.0) == 10.0
    # a = 0.5 * 0.10 - 0.5 * 0.30 = -0.10; (e^-0.1 - e^-1) / (e - e^-1) = 0.536958 / 2.350402
    assert label_robust_score(30.0, 10.0) == pytest.approx(22.8454, abs=1e-4)
    # b = 0.5 * 0.10 + 0.5 * 0.05 = 0.075; (e^0.075 - e^-1) / (e - e^-1) = 0.710005 / 2.350402
    assert augmentation_robust_score(10.0, 5.0) == pytest.approx(30.2078, abs=1e-4)
    assert set_scores(80.0, 70.0, set_hard=60.0, full_data_hard=90.0, set_plain=50.0, random_plain=45.0) == \
        {"HLR": 30.0, "IOR": 10.0, "LRS": pytest.approx(22.8454, abs=1e-4), "ARS": pytest.approx(30.2078, abs=1e-4)}


def test_the_normalisation_spans_zero_to_a_hundred():
    assert label_robust_score(hlr=100.0, ior=-100.0) == pytest.approx(0.0, abs=1e-12)
    assert label_robust_score(hlr=-100.0, ior=100.0) == pytest.approx(100.0)
    neutral = 100 * (1 - math.exp(-1)) / (math.exp(1) - math.exp(-1))  # as good as full data, no better than random
    assert label_robust_score(0.0, 0.0) == pytest.approx(neutral) == pytest.approx(26.894, abs=1e-3)
    assert label_robust_score(0.0, 10.0, weight=1.0) > label_robust_score(0.0, 10.0)


def test_only_the_scores_whose_inputs_exist_are_given():
    assert set_scores(80.0, 70.0) == {"IOR": 10.0}
    assert set_scores(None, 70.0, set_hard=60.0, full_data_hard=90.0) == {"HLR": 30.0}
    assert set_scores(80.0, 70.0, set_plain=50.0) == {"IOR": 10.0}


def test_the_full_data_reference_is_trained_once_and_cached(isolated_data, monkeypatch):
    calls = []
    real_evaluate = references.evaluate

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(references, "evaluate", counting)
    short = {"epochs": 1}
    first = references.full_data_reference("digits", preset="smoke", show_progress=False, overrides=short)
    assert len(calls) == 1 and calls[0]["overrides"] == short and first["train_images"] == 1442
    again = references.full_data_reference("digits", preset="smoke", show_progress=False, overrides=short)
    assert len(calls) == 1 and again == first
    stored = json.loads(open(first["path"]).read())
    assert stored["mean"] == first["mean"] and stored["config"]["epochs"] == 1
    other_seed = references.full_data_reference("digits", preset="smoke", seed=1, show_progress=False,
                                                overrides=short)
    assert len(calls) == 2 and other_seed["path"] != first["path"]


@pytest.mark.slow
def test_the_smoke_full_data_reference_learns_digits(isolated_data):
    reference = references.full_data_reference("digits", preset="smoke", show_progress=False)
    assert reference["config"]["epochs"] == references.FULL_DATA_EPOCHS["smoke"] == 20
    assert reference["mean"] > 50.0  # 20 epochs of 6 steps on every training image; chance is 10 %


def test_a_damaged_reference_cache_is_refused_with_its_path(isolated_data):
    config = references.full_data_config("smoke")
    path = references.reference_path("digits", "convnet", "smoke", config, [0])
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(DDKitError, match="cannot read the cached reference .*; delete it"):
        references.full_data_reference("digits", preset="smoke", show_progress=False)
    with pytest.raises(DDKitError, match="unknown preset 'fast'"):
        references.full_data_config("fast")
