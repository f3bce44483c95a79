"""The model zoo beyond the ConvNet: MobileNetV2, WRN and ShuffleNetV2 (shapes, taps, options). Tiny tensors only."""

import pytest
import torch
from torch import nn

from ddkit.errors import DDKitError
from ddkit.models import available, count_parameters, create


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add contention on a busy machine (100x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ==================================================================================================
# models
# ==================================================================================================

NEW_MODELS = ("mobilenetv2", "wrn", "wrn16_2", "shufflenetv2")
# reduced sizes, as the quick tier would use them
SMALL = {
    "mobilenetv2": dict(width_mult=0.25, last_channels=32),
    "wrn": dict(width=4, widen=1, depth=10),
    "wrn16_2": dict(width=4),
    "shufflenetv2": dict(width_mult=0.25, last_channels=32),
}


def test_new_models_registered():
    names = available()
    for name in NEW_MODELS:
        assert name in names


@pytest.mark.parametrize("name", NEW_MODELS)
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_model_shapes_taps_and_backward(name, channels, size):
    torch.manual_seed(0)  # module init only
    model = create(name, channels, 10, size)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for tap in ("features", "embedding", "logits"):
        assert tap in model.tap_names
    assert model.tap_names[-2:] == ("embedding", "logits")
    x = torch.randn(2, channels, size, size, generator=gen(1), requires_grad=True)
    out = model.forward_taps(x, model.tap_names)
    assert out["logits"].shape == (2, 10)
    assert out["embedding"].shape == (2, model.embedding_dim)
    assert model.classifier.in_features == model.embedding_dim
    feats = out["features"]
    assert feats.dim() == 4 and feats.shape[1] == model.embedding_dim
    assert min(feats.shape[2:]) >= 2
    out["logits"].square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


def test_model_defaults_are_the_gvbsm_pool():
    mob = create("mobilenetv2", 3, 10, 32)
    assert mob.width_mult == 0.5 and mob.embedding_dim == 1280
    wrn = create("wrn16_2", 3, 10, 32)
    assert (wrn.depth, wrn.widen, wrn.embedding_dim) == (16, 2, 128)
    assert count_parameters(wrn) == count_parameters(create("wrn", 3, 10, 32))
    shuf = create("shufflenetv2", 3, 10, 32)
    assert shuf.width_mult == 0.5 and shuf.embedding_dim == 1024
    x = torch.randn(2, 3, 32, 32, generator=gen())
    assert shuf.forward_taps(x, ["stage4"])["stage4"].shape == (2, 192, 4, 4)
    assert mob.forward_taps(x, ["head"])["head"].shape == (2, 1280, 4, 4)
    assert wrn.forward_taps(x, ["group3"])["group3"].shape == (2, 128, 8, 8)


@pytest.mark.parametrize("name", NEW_MODELS)
def test_model_reduced_width_tiny_images(name):
    small = create(name, 3, 5, 8, **SMALL[name])
    assert count_parameters(small) < count_parameters(create(name, 3, 5, 8)) / 2
    x = torch.randn(2, 3, 8, 8, generator=gen())
    out = small.forward_taps(x, small.tap_names)
    assert out["logits"].shape == (2, 5)
    maps = [v for v in out.values() if v.dim() == 4]
    assert all(min(v.shape[2:]) >= 2 for v in maps)  # tiny-image stride rule
    assert any(isinstance(m, nn.BatchNorm2d) for m in small.modules())


@pytest.mark.parametrize(
    "name,opts",
    [
        ("wrn", dict(depth=15)),
        ("wrn", dict(widen=0)),
        ("mobilenetv2", dict(width_mult=0)),
        ("shufflenetv2", dict(width_mult=-1.0)),
        ("shufflenetv2", dict(last_channels=0)),
        ("wrn16_2", dict(depth=16)),  # the alias fixes depth and widen
    ],
)
def test_model_bad_options(name, opts):
    with pytest.raises(DDKitError):
        create(name, 3, 10, 32, **opts)


