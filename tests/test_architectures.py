"""Every registered architecture runs at every evaluation preset on every registered dataset.

`--preset smoke --arch alexnet` failed (the smoke tier's `model.width=32` is a ConvNet option) after
the ConvNet run was already stored. These tests build each architecture with the options each preset
(and soft recipe) gives it, at each dataset's image shape, and run one forward pass; the evaluator
then trains every evaluation architecture for one epoch on digits.
"""

import pytest
import torch

import ddkit
from ddkit.data.registry import DATASETS
from ddkit.evaluate.protocols import ARCHITECTURES, build_model, model_options_for, resolve_config
from ddkit.evaluate.soft import SOFT_PRESETS, SOFT_RECIPES
from ddkit.models import available


def _model_options_of_every_preset() -> list[dict]:
    """The distinct ``model`` options of the hard presets and of every (soft tier, recipe)."""
    configs = [resolve_config("hard", preset) for preset in ("smoke", "quick", "paper")]
    configs += [resolve_config("soft", tier, None, recipe) for tier in SOFT_PRESETS for recipe in SOFT_RECIPES]
    distinct = []
    for config in configs:
        preset_model = dict(config["model"])
        if preset_model not in distinct:
            distinct.append(preset_model)
    return distinct


@pytest.fixture
def one_thread():
    """One intra-op thread: a forward of a depthwise network on two images takes seconds with two
    threads on a busy two-core machine, and a fraction of a second with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("arch", available())
def test_every_architecture_builds_and_runs_at_every_preset(arch, dataset, one_thread):
    spec = DATASETS[dataset]
    channels, height, width = spec.image_shape
    for preset_model in _model_options_of_every_preset():
        options = model_options_for(arch, preset_model, preset_model)
        model = build_model(arch, channels, spec.num_classes, height, options, seed=0, device="cpu").eval()
        with torch.no_grad():
            logits = model(torch.rand(2, channels, height, width))
        assert logits.shape == (2, spec.num_classes) and torch.isfinite(logits).all(), (arch, dataset, preset_model)


def test_an_option_an_architecture_lacks_is_still_refused_when_asked_for():
    preset_model = resolve_config("hard", "smoke")["model"]
    assert model_options_for("alexnet", preset_model, preset_model) == {}  # the tier's width: not AlexNet's
    assert model_options_for("convnet", preset_model, preset_model) == {"width": 32}
    assert model_options_for("alexnet", {"width": 64}, preset_model) == {"width": 64}  # --set model.width=64: kept
    distilled = ddkit.distill("random", dataset="digits", ipc=1)
    with pytest.raises(ddkit.DDKitError, match="unknown option.*width.*alexnet"):
        ddkit.evaluate(distilled, preset="smoke", runs=1, archs=["alexnet"], overrides=["model.width=64"],
                       show_progress=False)


def test_every_evaluation_architecture_trains_at_the_smoke_preset(one_thread):
    distilled = ddkit.distill("random", dataset="digits", ipc=1)
    results = ddkit.evaluate(distilled, preset="smoke", runs=1, archs=list(ARCHITECTURES), overrides=["epochs=1"],
                             show_progress=False)
    assert sorted(results) == sorted(ARCHITECTURES)
    for result in results.values():
        assert 0.0 <= result.mean <= 100.0 and result.preset == "smoke"
