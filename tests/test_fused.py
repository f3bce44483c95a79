"""A ConvNet's first block as one pass (ddkit.models.fused): the layer-by-layer values and gradients
up to float rounding, and only where it applies (CPU float32, the block's inner tap not asked for;
with gradients, one input channel and a standard-layout next layer)."""

import pytest
import torch
from torch import nn

from ddkit.methods.sources import channels_last_twin
from ddkit.models import create, fused
from ddkit.models.base import AvgPool2x2

CL = torch.channels_last


def _block(in_channels: int, channels: int, padding: int) -> nn.Sequential:
    torch.manual_seed(1)
    block = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=padding), nn.GroupNorm(channels, channels),
                          nn.ReLU(inplace=True), AvgPool2x2())
    nn.init.normal_(block[1].weight, 1.0, 0.5)  # gamma and beta away from their defaults, so both count
    nn.init.normal_(block[1].bias, 0.0, 0.5)
    return block


def _layer_by_layer(block, x):
    with torch.no_grad():
        return block[3](block[2](block[1](block[0](x))))


@pytest.mark.parametrize("in_channels,size,padding,count", [(1, 28, 3, 37), (3, 32, 1, 5), (1, 10, 0, 16)])
def test_the_fused_block_equals_conv_norm_relu_pool_to_float_rounding(in_channels, size, padding, count):
    block = _block(in_channels, 24, padding)
    x = torch.randn(count, in_channels, size, size) * 2 + 0.5
    with torch.no_grad():
        assert fused.fusable_first_block(block, x)
        for sub_batch in (1, 16, 64):  # sub-batches that split the batch unevenly, and one that holds it
            out = fused.conv_instance_norm_relu_pool(x, block[0], block[1], channels_last=False, sub_batch=sub_batch)
            assert out.is_contiguous()
            torch.testing.assert_close(out, _layer_by_layer(block, x), atol=2e-6, rtol=1e-5)
        in_cl = fused.conv_instance_norm_relu_pool(x, block[0], block[1], channels_last=True, sub_batch=64)
        assert in_cl.is_contiguous(memory_format=CL)
        torch.testing.assert_close(in_cl, out, atol=0, rtol=0)  # the same numbers, another layout


def test_a_constant_image_gives_the_norms_shift_as_group_norm_does():
    """Zero variance: every pixel of the convolution equals its mean, so the norm outputs beta (the
    rounding of the convolution is scaled by 1 / sqrt(eps) there, in GroupNorm as here)."""
    block = _block(1, 8, 0)
    x = torch.full((3, 1, 8, 8), 0.7)
    with torch.no_grad():
        out = fused.conv_instance_norm_relu_pool(x, block[0], block[1], channels_last=False)
    expected = block[1].bias.detach().clamp_min(0)[None, :, None, None].expand(3, 8, 3, 3)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(out, _layer_by_layer(block, x), atol=1e-4, rtol=0)


def test_only_a_cpu_float32_forward_through_that_block_is_fused():
    block = _block(1, 8, 1)
    x = torch.randn(2, 1, 8, 8)
    assert fused.fusable_first_block(block, x)  # with gradients too (FirstBlockWithGradients)
    with torch.no_grad():
        assert fused.fusable_first_block(block, x)
        assert not fused.fusable_first_block(block, x.double())
        assert not fused.fusable_first_block(block, torch.randn(2, 1, 7, 7))  # odd map: the pool drops a row
        other_norm = nn.Sequential(block[0], nn.BatchNorm2d(8), block[2], block[3])
        assert not fused.fusable_first_block(other_norm, x)
        strided = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), block[1], block[2], block[3])
        assert not fused.fusable_first_block(strided, x)
        max_pool = nn.Sequential(block[0], block[1], block[2], nn.MaxPool2d(2))
        assert not fused.fusable_first_block(max_pool, x)


def _convnet(in_channels, size, width=64):
    """A ConvNet-3 with instance norm; width 64 and 1-channel images of 16 x 16 or more: its first
    block runs in one pass (fused.one_pass_pays)."""
    torch.manual_seed(0)
    return create("convnet", in_channels=in_channels, num_classes=10, image_size=size, width=width, depth=3)


@pytest.mark.parametrize("in_channels,size", [(1, 28), (1, 16)])
def test_convnet_taps_without_gradients_match_the_unfused_network(in_channels, size, monkeypatch):
    net = _convnet(in_channels, size)
    twin = channels_last_twin(net)
    x = torch.randn(20, in_channels, size, size)
    with torch.no_grad():
        fused_taps = {name: model.forward_taps(x, ("block1", "embedding")) for name, model in
                      (("standard", net), ("channels_last", twin))}
        assert fused_taps["channels_last"]["block1"].is_contiguous(memory_format=CL)
        assert fused_taps["standard"]["block1"].is_contiguous()
        monkeypatch.setattr(fused, "fusable_first_block", lambda layers, x: False)
        plain = net.forward_taps(x, ("block1", "embedding"))
    for taps in fused_taps.values():
        for name in ("block1", "embedding"):
            torch.testing.assert_close(taps[name], plain[name], atol=2e-5, rtol=1e-4)


def test_convnet_runs_layer_by_layer_when_the_first_blocks_tap_is_wanted(monkeypatch):
    net = _convnet(1, 28)
    x = torch.randn(4, 1, 28, 28)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the first block was fused")

    monkeypatch.setattr(fused, "conv_instance_norm_relu_pool", must_not_run)
    with torch.no_grad():
        assert net.forward_taps(x, ("block0", "embedding"))["block0"].shape == (4, 64, 32, 32)
    with_gradients = net.forward_taps(x.requires_grad_(True), ("block0", "embedding"))
    assert with_gradients["embedding"].requires_grad


def test_the_one_pass_runs_only_where_it_pays():
    """One input channel, 64 channels or more, maps of 16 x 16 pixels or more (fused.one_pass_pays):
    3-channel images, narrow networks and 8 x 8 digits keep the layers, with or without gradients."""
    assert fused.one_pass_pays(nn.Conv2d(1, 64, 3, padding=0), torch.empty(1, 1, 18, 18))  # 16 x 16 x 64
    assert not fused.one_pass_pays(nn.Conv2d(1, 64, 3, padding=0), torch.empty(1, 1, 16, 16))  # 14 x 14
    assert not fused.one_pass_pays(nn.Conv2d(1, 32, 3, padding=3), torch.empty(1, 1, 28, 28))
    assert not fused.one_pass_pays(nn.Conv2d(3, 128, 3, padding=1), torch.empty(1, 3, 32, 32))
    for net, shape in ((_convnet(3, 32), (2, 3, 32, 32)), (_convnet(1, 28, width=32), (2, 1, 28, 28)),
                       (_convnet(1, 8, width=128), (2, 1, 8, 8))):
        with torch.no_grad():
            assert fused.fusable_first_block(net.features, torch.empty(shape))  # the form fits, the size does not
            assert net.one_pass_first_block(torch.randn(shape)) is None
            assert channels_last_twin(net).one_pass_first_block(torch.randn(shape)) is None
    with torch.no_grad():
        assert _convnet(1, 28).one_pass_first_block(torch.randn(2, 1, 28, 28)) is not None


def _first_backward_node(out: torch.Tensor) -> str:
    """The name of the backward node nearest the input along the first inputs of ``out``'s graph."""
    node, name = out.grad_fn, None
    while node is not None:
        name = type(node).__name__
        node = next((f for f, _ in node.next_functions if f is not None and type(f).__name__ != "AccumulateGrad"),
                    None)
    return name


def test_with_gradients_a_one_channel_block_runs_in_one_pass_where_it_pays():
    one = _convnet(1, 28)
    out = one.embed(torch.randn(3, 1, 28, 28).requires_grad_(True))
    assert _first_backward_node(out) == "FirstBlockWithGradientsBackward"
    others = {"3 channels": (_convnet(3, 32), 3, 32),  # oneDNN's 3-channel convolution is faster
              "32 channels": (_convnet(1, 28, width=32), 1, 28),
              "8 x 8 digits": (_convnet(1, 8, width=128), 1, 8),
              "a channels-last next layer": (channels_last_twin(_convnet(1, 28)), 1, 28)}
    for name, (net, channels, size) in others.items():
        out = net.embed(torch.randn(3, channels, size, size).requires_grad_(True))
        assert _first_backward_node(out) != "FirstBlockWithGradientsBackward", name


@pytest.mark.parametrize("in_channels,size,padding,count", [(1, 28, 3, 37), (3, 32, 1, 5), (1, 10, 0, 16)])
def test_the_fused_blocks_gradients_equal_autograds_through_the_layers(in_channels, size, padding, count):
    """Every gradient (images, convolution weight and bias, the norm's gamma and beta) in float64,
    where the two differ by rounding only, over sub-batches that split the batch unevenly."""
    block = _block(in_channels, 24, padding).double()
    x = (torch.randn(count, in_channels, size, size, dtype=torch.float64) * 2 + 0.5).requires_grad_(True)
    reference = block[3](block[2](block[1](block[0](x))))
    upstream = torch.randn_like(reference)
    wanted = [x, *block.parameters()]  # x, conv weight, conv bias, gamma, beta
    expected = torch.autograd.grad(reference, wanted, upstream)
    for sub_batch in (16, 64):
        out = fused.first_block_with_gradients(x, block[0], block[1], sub_batch=sub_batch)
        torch.testing.assert_close(out, reference, atol=1e-12, rtol=1e-10)
        got = torch.autograd.grad(out, wanted, upstream)
        for name, a, b in zip(("x", "weight", "bias", "gamma", "beta"), got, expected):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=name)  # the bias's: 0 and ~1e-15


def test_the_fused_blocks_gradient_only_for_what_asks_for_one():
    """Frozen layers (distribution matching's random networks): only the images' gradient, in float32
    as the layers give it to rounding; frozen images (training): only the weights'."""
    block = _block(1, 16, 3)
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    x = (torch.randn(20, 1, 28, 28) * 2 + 0.5).requires_grad_(True)
    reference = block[3](block[2](block[1](block[0](x))))
    upstream = torch.randn_like(reference)
    (expected,) = torch.autograd.grad(reference, x, upstream)
    out = fused.first_block_with_gradients(x, block[0], block[1])
    out.backward(upstream)
    torch.testing.assert_close(x.grad, expected, atol=1e-5, rtol=1e-4)
    assert all(parameter.grad is None for parameter in block.parameters())
    trained = _block(1, 16, 3)
    fused.first_block_with_gradients(x.detach(), trained[0], trained[1]).backward(upstream)
    assert all(parameter.grad is not None for parameter in trained.parameters())


def test_a_convnet_trains_the_same_with_the_fused_block(monkeypatch):
    """Five SGD steps of a 1-channel ConvNet, one pass against layer by layer: the same weights to
    float rounding."""
    import torch.nn.functional as F

    x = torch.randn(32, 1, 28, 28)
    labels = torch.randint(0, 10, (32,))
    nets = {}
    for path in ("one pass", "layer by layer"):
        if path == "layer by layer":
            monkeypatch.setattr(fused, "fusable_first_block", lambda layers, x: False)
        net = _convnet(1, 28)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        for _ in range(5):
            optimizer.zero_grad()
            F.cross_entropy(net(x), labels).backward()
            optimizer.step()
        nets[path] = net
    for (name, a), b in zip(nets["one pass"].named_parameters(), nets["layer by layer"].parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


def test_under_bf16_autocast_the_fused_block_stays_float32():
    net = _convnet(1, 28)
    x = torch.randn(6, 1, 28, 28)
    block = net.features
    with torch.no_grad():
        reference = _layer_by_layer(block, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fused.fusable_first_block(block, x)
            out = fused.conv_instance_norm_relu_pool(x, block[0], block[1], channels_last=False)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=2e-6, rtol=1e-5)


def test_an_images_result_does_not_depend_on_its_place_in_the_batch():
    """Sharded relabelling and split runs rely on it: the same image gives the same bits in any batch."""
    block = _block(1, 16, 3)
    x = torch.randn(40, 1, 28, 28)
    with torch.no_grad():
        whole = fused.conv_instance_norm_relu_pool(x, block[0], block[1], channels_last=False)
        for part in (x[1:8], x[17:40], x[5:6]):
            start = int((x == part[0]).all(dim=(1, 2, 3)).nonzero()[0])
            alone = fused.conv_instance_norm_relu_pool(part, block[0], block[1], channels_last=False)
            assert torch.equal(alone, whole[start:start + part.shape[0]])


def test_a_hooked_layer_keeps_the_block_layer_by_layer():
    """Hooks that read a layer's input or output (G-VBSM's convolution statistics) must see it run."""
    net = _convnet(3, 32, width=32)
    seen = []
    handle = net.features[0].register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not fused.fusable_first_block(net.features, x)
        net.embed(x)
    assert seen == [(2, 32, 32, 32)]
    handle.remove()
    with torch.no_grad():
        assert fused.fusable_first_block(net.features, x)
    handle = net.features[1].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    assert not fused.fusable_first_block(net.features, x)  # a backward hook must see the norm's gradient
    handle.remove()


def test_a_rounded_result_is_the_float32_result_rounded_once():
    block = _block(1, 24, 3)
    x = torch.randn(37, 1, 28, 28)
    with torch.no_grad():
        full = fused.conv_instance_norm_relu_pool(x, block[0], block[1], channels_last=True, sub_batch=16)
        rounded = fused.conv_instance_norm_relu_pool(x, block[0], block[1], channels_last=True, sub_batch=16,
                                                     out_dtype=torch.bfloat16)
    assert rounded.dtype == torch.bfloat16 and rounded.is_contiguous(memory_format=CL)
    assert torch.equal(rounded, full.to(torch.bfloat16))


def test_under_bf16_autocast_a_convnet_rounds_the_fused_block_as_its_next_convolution_would(monkeypatch):
    """The next convolution rounds its input to bf16 under autocast: rounding the block's output
    sub-batch by sub-batch gives the same network output, bit for bit."""
    net = channels_last_twin(_convnet(1, 28))
    x = torch.randn(40, 1, 28, 28)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = net.forward_taps(x, ("block1", "embedding"))
        kept = fused.conv_instance_norm_relu_pool
        monkeypatch.setattr(fused, "conv_instance_norm_relu_pool",
                            lambda *args, out_dtype=None, **kwargs: kept(*args, **kwargs))  # float32 out
        reference = net.forward_taps(x, ("block1", "embedding"))
    for name in ("block1", "embedding"):
        assert got[name].dtype == reference[name].dtype == torch.bfloat16
        assert torch.equal(got[name], reference[name]), name


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_relu_maps_group_sums_equal_those_of_the_layer_by_layer_map(channels_last):
    block = _block(1, 24, 3)
    x = torch.randn(37, 1, 28, 28) * 2 + 0.5
    groups = torch.randint(0, 4, (37,), generator=torch.Generator().manual_seed(0))  # unsorted, across sub-batches
    with torch.no_grad():
        relu_map = block[2](block[1](block[0](x)))  # [37, 24, 32, 32]
        expected = torch.zeros(4, 24, 32, 32).index_add_(0, groups, relu_map)
        for sub_batch in (16, 64):
            pooled, sums = fused.conv_instance_norm_relu_pool(x, block[0], block[1], channels_last=channels_last,
                                                              sub_batch=sub_batch, relu_sums=(groups, 4))
            assert sums.shape == (4, 24, 32, 32) and sums.dtype == torch.float32
            assert sums.is_contiguous(memory_format=CL) if channels_last else sums.is_contiguous()
            torch.testing.assert_close(sums, expected, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(pooled, block[3](relu_map), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("layer_by_layer", [False, True])
def test_convnet_tap_sums_equal_the_group_sums_of_every_images_taps(layer_by_layer, monkeypatch):
    """forward_taps(..., sums=TapSums(...)): ConvNet's block0 summed inside the one-pass block,
    block1 from every image's map; the same numbers as summing what forward_taps returns."""
    from ddkit.models.base import TapSums

    twin = channels_last_twin(_convnet(1, 28))
    x = torch.randn(20, 1, 28, 28)
    groups = torch.arange(20) // 7  # class-major, three groups of 7, 7 and 6
    names = ("block0", "block1", "embedding")
    if layer_by_layer:
        monkeypatch.setattr(fused, "fusable_first_block", lambda layers, x: False)
    calls = []
    one_pass = fused.conv_instance_norm_relu_pool
    monkeypatch.setattr(fused, "conv_instance_norm_relu_pool",
                        lambda *args, **kwargs: calls.append(kwargs.get("relu_sums")) or one_pass(*args, **kwargs))
    with torch.no_grad():
        every = twin.forward_taps(x, names)
        got = twin.forward_taps(x, names, sums=TapSums(frozenset({"block0", "block1"}), groups, 3))
        alone = twin.forward_taps(x, ("block0",), sums=TapSums(frozenset({"block0"}), groups, 3))
    for name in ("block0", "block1"):
        expected = torch.zeros(3, *every[name].shape[1:]).index_add_(0, groups, every[name])
        torch.testing.assert_close(got[name], expected, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(alone["block0"], got["block0"], atol=0, rtol=0)
    # block0 per image: layer by layer; summed: in the one pass (unless turned off)
    assert [sums is not None for sums in calls] == ([] if layer_by_layer else [True, True])
    # block0 per image takes the layer-by-layer path: the one-pass block's embedding differs by rounding
    torch.testing.assert_close(got["embedding"], every["embedding"], atol=2e-5, rtol=1e-4)


def test_tap_sums_must_name_asked_taps_and_give_one_group_per_image():
    from ddkit.errors import DDKitError
    from ddkit.models.base import TapSums

    net = _convnet(1, 28)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad(), pytest.raises(DDKitError, match="one group per image"):
        net.forward_taps(x, ("embedding",), sums=TapSums(frozenset({"block0"}), torch.zeros(4, dtype=torch.long), 1))
    with torch.no_grad(), pytest.raises(DDKitError, match="one group per image"):
        net.forward_taps(x, ("block0",), sums=TapSums(frozenset({"block0"}), torch.zeros(3, dtype=torch.long), 1))


def test_group_sums_of_a_channels_last_map_equal_those_of_the_standard_layout():
    from ddkit.models.base import group_sums

    maps = torch.randn(9, 5, 4, 6)
    groups = torch.tensor([2, 0, 0, 1, 2, 2, 1, 0, 0])
    plain = group_sums(maps, groups, 3)
    cl = group_sums(maps.contiguous(memory_format=CL), groups, 3)
    assert cl.is_contiguous(memory_format=CL)
    torch.testing.assert_close(cl, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(plain[2], maps[0] + maps[4] + maps[5], atol=1e-6, rtol=0)


def test_under_bf16_autocast_the_fused_block_with_gradients_rounds_only_its_output():
    """The block runs in float32 and rounds its output to bf16 (as the next convolution would); its
    backward takes the bf16 gradient and gives the images the float32 block's gradient of it."""
    net = _convnet(1, 28)
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    x = torch.randn(20, 1, 28, 28, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net.one_pass_first_block(x)
    assert out.dtype == torch.bfloat16
    upstream = torch.randn(out.shape).to(torch.bfloat16)
    out.backward(upstream)
    x32 = x.detach().clone().requires_grad_(True)
    out32 = fused.first_block_with_gradients(x32, net.features[0], net.features[1])
    out32.backward(upstream.float())
    assert torch.equal(out, out32.detach().to(torch.bfloat16))
    assert torch.equal(x.grad, x32.grad)


def test_an_images_gradient_does_not_depend_on_its_place_in_the_batch():
    """Split runs give each process some classes' synthetic images: an image's gradient must be the
    same bits in a batch of one, at a sub-batch's edge or deep inside a large batch."""
    block = _block(1, 16, 3)
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    x = torch.randn(40, 1, 28, 28)
    upstream = torch.randn(40, 16, 16, 16)

    def gradient(images, grads):
        images = images.clone().requires_grad_(True)
        fused.first_block_with_gradients(images, block[0], block[1]).backward(grads)
        return images.grad

    whole = gradient(x, upstream)
    for start, stop in ((1, 8), (17, 40), (5, 6), (15, 33), (32, 33)):
        assert torch.equal(gradient(x[start:stop], upstream[start:stop]), whole[start:stop]), (start, stop)


def test_a_weight_changed_in_place_before_the_backward_is_an_error():
    """The backward recomputes the block from the saved images and weights: autograd's version
    check refuses weights changed in place since the forward, as it would through the layers."""
    block = _block(1, 8, 3)
    for parameter in block.parameters():
        parameter.requires_grad_(False)
    x = torch.randn(3, 1, 28, 28, requires_grad=True)
    out = fused.first_block_with_gradients(x, block[0], block[1])
    block[0].weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
