"""Tests for ddkit.models: shapes, taps, norms, registry and errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddkit.errors import DDKitError
from ddkit.models import (
    CRD_MODELS,
    TapModel,
    available,
    count_parameters,
    create,
    default_depth,
    load_crd_state_dict,
    register,
)
from ddkit.models import registry as registry_module

ALL_MODELS = ["alexnet", "convnet", "mlp", "mobilenetv2_crd", "resnet18", "resnet18_bn", "resnet18_in",
              "shufflenetv2_crd", "vgg11"]
SIZES = [(1, 28), (3, 32), (1, 8)]
# small widths keep the CPU tests fast where the option exists
FAST_OPTIONS = {"convnet": {"width": 32}, "mlp": {"width": 32}, "resnet18": {"width": 8},
                "resnet18_bn": {"width": 8}, "resnet18_in": {"width": 8},
                "mobilenetv2_crd": {"width_mult": 0.25, "last_channels": 32},
                "shufflenetv2_crd": {"width_mult": 0.25, "last_channels": 32}}  # fmt: skip


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _images(n: int, channels: int, size: int) -> torch.Tensor:
    return torch.randn(n, channels, size, size)


# -- registry -----------------------------------------------------------------------------------


def test_available_lists_all_models():
    names = available()
    assert names == sorted(names)
    for name in ALL_MODELS:
        assert name in names


def test_create_is_case_insensitive_and_returns_tapmodel():
    model = create("ConvNet", 3, 10, 32, width=16)
    assert isinstance(model, TapModel) and isinstance(model, nn.Module)
    assert model.arch == "convnet"


def test_register_custom_model_and_option_checking():
    class Tiny(TapModel):
        def __init__(self, c, k, s, hidden=4):
            super().__init__(c, k, s, arch="tiny_test_model")
            self.body = nn.Linear(c * s * s, hidden)
            self.classifier = nn.Linear(hidden, k)
            self.embedding_dim = hidden
            self._tap_names = ("embedding", "logits")

        def _stream(self, x):
            h = self.body(torch.flatten(x, 1))
            yield "embedding", h
            yield "logits", self.classifier(h)

    name = "tiny_test_model"
    try:

        @register(name)
        def tiny(in_channels, num_classes, image_size, hidden=4):
            return Tiny(in_channels, num_classes, image_size, hidden)

        assert name in available()
        model = create(name, 1, 3, 4, hidden=5)
        assert model(_images(2, 1, 4)).shape == (2, 3)
        assert model.embed(_images(2, 1, 4)).shape == (2, 5)
        with pytest.raises(DDKitError, match="hidden"):
            create(name, 1, 3, 4, width=5)
        with pytest.raises(ValueError):
            register(name)(tiny)
    finally:
        registry_module._REGISTRY.pop(name, None)


# -- shapes of every model ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("channels,size", SIZES)
def test_output_shapes_and_taps(name, channels, size):
    model = create(name, channels, 7, size, **FAST_OPTIONS.get(name, {})).eval()
    x = _images(3, channels, size)
    with torch.no_grad():
        logits = model(x)
        emb = model.embed(x)
        taps = model.forward_taps(x, model.tap_names)
    assert logits.shape == (3, 7)
    assert emb.shape == (3, model.embedding_dim)
    assert model.classifier.in_features == model.embedding_dim
    assert "embedding" in model.tap_names and "logits" in model.tap_names
    assert list(taps) == list(model.tap_names)
    torch.testing.assert_close(taps["logits"], logits)
    torch.testing.assert_close(taps["embedding"], emb)
    if "features" in taps and model.fixed_input_size:  # flatten nets: the final map flattened
        torch.testing.assert_close(taps["features"].flatten(1), emb)
    if "layer4" in taps:  # global-pool nets: the final map averaged
        torch.testing.assert_close(taps["features"].mean((2, 3)), emb)


@pytest.mark.parametrize("name", ["convnet", "alexnet", "vgg11", "resnet18", "mlp", "mobilenetv2_crd"])
def test_64px_rgb(name):
    model = create(name, 3, 5, 64, **FAST_OPTIONS.get(name, {})).eval()
    with torch.no_grad():
        assert model(_images(2, 3, 64)).shape == (2, 5)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_gradient_reaches_input_through_embed(name):
    channels, size = 3, 32
    model = create(name, channels, 4, size, **FAST_OPTIONS.get(name, {}))
    x = _images(4, channels, size).requires_grad_(True)
    emb = model.embed(x)
    (emb * torch.randn_like(emb)).sum().backward()
    assert x.grad is not None
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["vgg11", "resnet18_in", "alexnet", "convnet"])
def test_tiny_images_still_depend_on_the_input(name):
    # GroupNorm(C, C) on a 1x1 map would return its bias whatever the input
    model = create(name, 1, 10, 8, **FAST_OPTIONS.get(name, {})).eval()
    with torch.no_grad():
        a = model.embed(_images(1, 1, 8))
        b = model.embed(_images(1, 1, 8))
    assert not torch.allclose(a, b)


def test_count_parameters():
    # the reference ConvNet-3 (width 128, instance norm) on 32 px RGB with 10 classes
    model = create("convnet", 3, 10, 32)
    assert count_parameters(model) == 320010
    model.classifier.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 320010 - 2048 * 10


# -- convnet ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "channels,size,depth,dim",
    [(1, 28, 3, 2048), (3, 32, 3, 2048), (1, 8, 3, 128), (3, 28, 3, 128 * 3 * 3), (3, 64, 4, 2048)],
)
def test_convnet_embedding_dim(channels, size, depth, dim):
    model = create("convnet", channels, 10, size, depth=depth)
    assert model.embedding_dim == dim
    with torch.no_grad():
        assert model.embed(_images(2, channels, size)).shape == (2, dim)


def test_convnet_28px_rule_only_for_one_channel():
    assert create("convnet", 1, 10, 28).features[0].padding == (3, 3)
    assert create("convnet", 3, 10, 28).features[0].padding == (1, 1)
    assert create("convnet", 1, 10, 32).features[0].padding == (1, 1)
    assert create("convnet", 1, 10, 28).features[4].padding == (1, 1)


def test_default_depth():
    assert [default_depth(s) for s in (8, 28, 32, 64, 128, 256)] == [3, 3, 3, 4, 5, 6]
    assert create("convnet", 3, 10, 64, depth=None, width=8).depth == 4
    with pytest.raises(DDKitError):
        default_depth(0)


def test_convnet_tap_shapes_mnist():
    model = create("convnet", 1, 10, 28)
    assert model.tap_names == ("block0", "block1", "block2", "features", "embedding", "logits")
    with torch.no_grad():
        taps = model.forward_taps(_images(2, 1, 28), ["block0", "block1", "block2", "features"])
    assert taps["block0"].shape == (2, 128, 32, 32)
    assert taps["block1"].shape == (2, 128, 16, 16)
    assert taps["block2"].shape == (2, 128, 8, 8)
    assert taps["features"].shape == (2, 128, 4, 4)


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
def test_convnet_taps_equal_manual_computation(norm):
    model = create("convnet", 1, 10, 28, width=16, norm=norm)
    model.train()  # batch norm uses batch statistics: same result on the same batch
    x = _images(4, 1, 28).requires_grad_(True)
    taps = model.forward_taps(x, model.tap_names)

    # run the layers by hand, after the tapped call: a tap clobbered in place would differ
    conv = [m for m in model.features if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.features if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    assert len(norms) == (0 if norm == "none" else 3)
    h = x
    for d in range(3):
        h = conv[d](h)
        if norms:
            h = norms[d](h)
        h = torch.relu(h)
        torch.testing.assert_close(taps[f"block{d}"], h)
        assert (taps[f"block{d}"] >= 0).all()
        h = nn.functional.avg_pool2d(h, 2)
    torch.testing.assert_close(taps["features"], h)
    torch.testing.assert_close(taps["features"].reshape(4, -1), taps["embedding"])
    torch.testing.assert_close(taps["logits"], model.classifier(h.flatten(1)))
    # autograd would raise if a tensor it saved had been modified in place
    sum(t.sum() for t in taps.values()).backward()
    assert x.grad is not None


def test_forward_taps_stops_early():
    model = create("convnet", 3, 10, 32, width=8)
    calls = []
    model.classifier.register_forward_hook(lambda *_: calls.append(1))
    out = model.forward_taps(_images(2, 3, 32), ["block0"])
    assert list(out) == ["block0"] and calls == []
    model.forward_taps(_images(2, 3, 32), "logits")  # a single string is one tap name
    assert calls == [1]
    assert model.forward_taps(_images(2, 3, 32), []) == {}


def test_convnet_instance_norm_has_no_cross_sample_coupling():
    model = create("convnet", 3, 10, 32, width=16, norm="instance").train()
    x = _images(5, 3, 32)
    with torch.no_grad():
        together = model(x)
        apart = torch.cat([model(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-5)


def test_convnet_batch_norm_couples_samples_in_train_mode_only():
    model = create("convnet", 3, 10, 32, width=16, norm="batch").train()
    x = _images(6, 3, 32)
    with torch.no_grad():
        together = model(x)
        halves = torch.cat([model(x[:3]), model(x[3:])])
    assert not torch.allclose(together, halves, atol=1e-4)
    model.eval()
    with torch.no_grad():
        together = model(x)
        halves = torch.cat([model(x[:3]), model(x[3:])])
    torch.testing.assert_close(together, halves, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "norm,kind,groups",
    [("instance", nn.GroupNorm, 16), ("group", nn.GroupNorm, 4), ("layer", nn.GroupNorm, 1),
     ("batch", nn.BatchNorm2d, None), ("none", None, None)],
)  # fmt: skip
def test_convnet_norm_layers(norm, kind, groups):
    model = create("convnet", 3, 10, 32, width=16, norm=norm)
    found = [m for m in model.features if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    if kind is None:
        assert found == []
        assert len(model.features) == 3 * 3  # conv, relu, pool
    else:
        assert len(found) == 3 and all(type(m) is kind for m in found)
        if groups is not None:
            assert all(m.num_groups == groups and m.affine for m in found)


@pytest.mark.parametrize("pooling,dim", [("avg", 16 * 16), ("max", 16 * 16), ("none", 16 * 1024)])
def test_convnet_pooling(pooling, dim):
    model = create("convnet", 3, 10, 32, width=16, pooling=pooling)
    assert model.embedding_dim == dim
    with torch.no_grad():
        assert model(_images(2, 3, 32)).shape == (2, 10)


@pytest.mark.parametrize("activation", ["relu", "leakyrelu", "sigmoid", "gelu"])
def test_convnet_activations(activation):
    model = create("convnet", 3, 10, 32, width=8, activation=activation)
    with torch.no_grad():
        assert model(_images(2, 3, 32)).shape == (2, 10)


def test_convnet_channels_last():
    model = create("convnet", 3, 10, 32, width=16).eval()
    x = _images(3, 3, 32)
    with torch.no_grad():
        ref = model.forward_taps(x, ["features", "embedding", "logits"])
        x_cl = x.contiguous(memory_format=torch.channels_last)
        out = model.forward_taps(x_cl, ["features", "embedding", "logits"])
        model = model.to(memory_format=torch.channels_last)
        out2 = model.forward_taps(x_cl, ["features", "embedding", "logits"])
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out2[name], ref[name], rtol=1e-4, atol=1e-5)


# -- other models -------------------------------------------------------------------------------


def test_alexnet_and_vgg_reference_dims():
    assert create("alexnet", 1, 10, 28).embedding_dim == 192 * 4 * 4
    assert create("alexnet", 1, 10, 28).features[0].padding == (4, 4)
    assert create("alexnet", 3, 10, 32).features[0].padding == (2, 2)
    vgg = create("vgg11", 3, 10, 32)
    assert vgg.embedding_dim == 512 and vgg.classifier.in_features == 512
    assert sum(isinstance(m, nn.GroupNorm) for m in vgg.features) == 8  # instance by default
    assert create("vgg11", 1, 10, 28).features[0].padding == (3, 3)
    vgg_bn = create("vgg11", 3, 10, 32, norm="batch")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg_bn.features) == 8
    alex_bn = create("alexnet", 3, 10, 32, norm="batch")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in alex_bn.features) == 5


def test_resnet_variants():
    tap_names = ("stem", "layer1", "layer2", "layer3", "layer4", "features", "embedding", "logits")
    bn = create("resnet18_bn", 3, 10, 32, width=8)
    inorm = create("resnet18_in", 3, 10, 32, width=8)
    assert bn.tap_names == tap_names and inorm.tap_names == tap_names
    assert any(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in inorm.modules())
    group_norms = [m for m in inorm.modules() if isinstance(m, nn.GroupNorm)]
    assert group_norms and all(m.num_groups == m.num_channels for m in group_norms)
    assert create("resnet18", 3, 10, 32).embedding_dim == 512
    assert bn.embedding_dim == 64
    with torch.no_grad():
        taps = bn.eval().forward_taps(_images(2, 3, 32), ["stem", "layer4", "features"])
    assert taps["stem"].shape == (2, 8, 32, 32)
    assert taps["layer4"].shape == (2, 64, 4, 4)
    torch.testing.assert_close(taps["features"], taps["layer4"])
    with pytest.raises(DDKitError, match="width"):
        create("resnet18_in", 3, 10, 32, norm="batch")


# -- the CRD model zoo (G-VBSM's teachers; the golden tests check their outputs) --------------------


def test_crd_forms_differ_from_ddkit_forms_where_the_reference_does():
    x = _images(2, 3, 32)
    crd_mob, own_mob = create("mobilenetv2_crd", 3, 10, 32).eval(), create("mobilenetv2", 3, 10, 32).eval()
    with torch.no_grad():
        crd_taps = crd_mob.forward_taps(x, ["stem", "stage1", "head"])
        own_taps = own_mob.forward_taps(x, ["stem", "stage1", "head"])
    assert crd_taps["stem"].shape == (2, 16, 16, 16) and own_taps["stem"].shape == (2, 16, 32, 32)  # stride 2
    assert crd_taps["stage1"].shape[1] == 8 and own_taps["stage1"].shape[1] == 8
    assert crd_taps["head"].shape == (2, 1280, 2, 2) and own_taps["head"].shape == (2, 1280, 4, 4)
    assert crd_mob.stages[1][0].project[0].out_channels == 12  # int(24 * 0.5), not rounded up to 16
    assert own_mob.stages[1][0].project[0].out_channels == 16
    assert crd_mob.stages[0][0].expand is not None and own_mob.stages[0][0].expand is None  # t = 1
    assert create("shufflenetv2_crd", 3, 10, 32).stem[0].kernel_size == (1, 1)
    assert create("shufflenetv2", 3, 10, 32).stem[0].kernel_size == (3, 3)
    assert set(CRD_MODELS.values()) <= set(available())


def test_mobilenetv2_crd_starts_from_the_reference_initialisation():
    model = create("mobilenetv2_crd", 3, 100, 32)
    assert model.classifier.bias.abs().sum() == 0
    assert abs(model.classifier.weight.std().item() - 0.01) < 0.001  # N(0, 0.01), 128,000 draws
    # He-normal over the fan-out: std sqrt(2 / 160) = 0.112 (PyTorch's default would give 0.026)
    projection = model.stages[6][0].project[0].weight  # [160, 480, 1, 1]
    assert abs(projection.std().item() - (2 / 160) ** 0.5) < 0.005
    assert all(m.weight.eq(1).all() and m.bias.eq(0).all() for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def _as_crd_resnet18(model) -> dict:
    """A ddkit ResNet-18's state dict under the CRD zoo's keys (its head is ``linear``)."""
    return {k.replace("classifier.", "linear.", 1): v.clone() for k, v in model.state_dict().items()}


def test_load_crd_state_dict_round_trip():
    source = create("resnet18_bn", 3, 10, 32, width=8).eval()
    target = create("resnet18_bn", 3, 10, 32, width=8).eval()
    assert load_crd_state_dict(target, _as_crd_resnet18(source)) is target
    x = _images(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "name,options,match",
    [("resnet18_bn", {"width": 8}, "class count"),  # 10 classes into a 5-class head
     ("convnet", {"width": 8}, "no counterpart"),
     ("resnet18_in", {"width": 8}, "no counterpart"),
     ("mobilenetv2", {}, "mobilenetv2_crd")],
)  # fmt: skip
def test_load_crd_state_dict_refuses_what_does_not_fit(name, options, match):
    state = _as_crd_resnet18(create("resnet18_bn", 3, 10, 32, width=8))
    with pytest.raises(DDKitError, match=match) as err:
        load_crd_state_dict(create(name, 3, 5, 32, **options), state)
    assert "\n" not in str(err.value)


def test_mobilenetv2_crd_width_too_small():
    with pytest.raises(DDKitError, match="width_mult"):
        create("mobilenetv2_crd", 3, 10, 32, width_mult=0.05)


def test_mlp_taps():
    model = create("mlp", 1, 10, 28, width=16, depth=2)
    assert model.tap_names == ("hidden0", "hidden1", "embedding", "logits")
    taps = model.forward_taps(_images(2, 1, 28), model.tap_names)
    torch.testing.assert_close(taps["hidden1"], taps["embedding"])
    assert taps["hidden0"].shape == (2, 16)


# -- errors -------------------------------------------------------------------------------------


def test_unknown_model_lists_choices():
    with pytest.raises(DDKitError, match="convnet") as err:
        create("transformer", 3, 10, 32)
    assert "\n" not in str(err.value)


def test_unknown_tap():
    model = create("convnet", 3, 10, 32, width=8)
    with pytest.raises(DDKitError, match="block0"):
        model.forward_taps(_images(1, 3, 32), ["block9"])


@pytest.mark.parametrize("name", ["convnet", "alexnet", "vgg11", "resnet18"])
def test_bad_norm(name):
    with pytest.raises(DDKitError, match="norm"):
        create(name, 3, 10, 32, norm="weird")


@pytest.mark.parametrize(
    "options",
    [{"widht": 64}, {"width": 0}, {"width": "wide"}, {"depth": 2.5}, {"pooling": "sum"},
     {"activation": "swish"}, {"depth": 6}, {"norm": "group", "width": 6}],
)  # fmt: skip
def test_bad_convnet_options(options):
    with pytest.raises(DDKitError):
        create("convnet", 1, 10, 8, **options)


@pytest.mark.parametrize("args", [(0, 10, 32), (3, 0, 32), (3, 10, -1), (3, 10, 32.0)])
def test_bad_sizes(args):
    with pytest.raises(DDKitError):
        create("convnet", *args)


def test_wrong_input_shape():
    model = create("convnet", 3, 10, 32, width=8)
    with pytest.raises(DDKitError, match="channel"):
        model(_images(1, 1, 32))
    with pytest.raises(DDKitError, match="32x32"):
        model(_images(1, 3, 28))
    with pytest.raises(DDKitError):
        model(torch.randn(3, 32, 32))
    # global-pool nets take any size
    resnet = create("resnet18", 3, 10, 32, width=8).eval()
    with torch.no_grad():
        assert resnet(_images(1, 3, 40)).shape == (1, 10)


def test_the_size_probe_runs_once_per_model_and_options(monkeypatch):
    from ddkit.models import registry

    probes = []
    real_probe = registry._probe_size
    monkeypatch.setattr(registry, "_SIZE_CHECKED", set())
    monkeypatch.setattr(registry, "_probe_size", lambda *args: probes.append(args[1:]) or real_probe(*args))
    for _ in range(3):
        create("convnet", 1, 10, 28, width=8, depth=2)
    assert len(probes) == 1
    create("convnet", 1, 10, 28, width=16, depth=2)  # other options: probed again
    assert len(probes) == 2
    for _ in range(2):  # a refused size is refused every time
        with pytest.raises(DDKitError, match="GiB of parameters"):
            create("convnet", 1, 10, 28, width=10 ** 6)
    assert len(probes) == 4
