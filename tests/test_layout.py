"""GroupNorm on small channels-last maps runs in the standard layout: same values up to rounding."""

import torch
from torch import nn

from ddkit.models import create
from ddkit.models.base import GROUP_NORM_CONTIGUOUS_PIXELS, norm_layout, run_norm

CL = torch.channels_last


def test_norm_layout_copies_only_small_channels_last_maps_before_a_group_norm():
    norm = nn.GroupNorm(8, 8)
    small = torch.randn(2, 8, 16, 16).contiguous(memory_format=CL)
    moved = norm_layout(norm, small)
    assert moved.is_contiguous() and torch.equal(moved, small)
    large = torch.randn(2, 8, 32, 32).contiguous(memory_format=CL)
    assert 32 * 32 > GROUP_NORM_CONTIGUOUS_PIXELS and norm_layout(norm, large) is large
    plain = torch.randn(2, 8, 16, 16)
    assert norm_layout(norm, plain) is plain
    assert norm_layout(nn.ReLU(), small) is small
    assert norm_layout(nn.BatchNorm2d(8), small) is small


def test_group_norm_in_either_layout_agrees_to_float_rounding():
    torch.manual_seed(0)
    norm = nn.GroupNorm(128, 128)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    for size in (16, 8, 4):
        x = torch.randn(6, 128, size, size) * 3 + 1
        channels_last = norm(x.contiguous(memory_format=CL))
        standard = norm(x)
        assert channels_last.is_contiguous(memory_format=CL) and standard.is_contiguous()
        assert torch.allclose(channels_last, standard, atol=1e-5, rtol=0), size


def _old_taps(net, x):
    """The ConvNet's taps as computed before ``norm_layout`` and the in-place ReLU: every layer on its
    input as it comes, the ReLU out of place."""
    h, taps = x, {}
    for i, layer in enumerate(net.features):
        h = torch.relu(h) if isinstance(layer, nn.ReLU) else layer(h)
        if i in net._tap_after:
            taps[net._tap_after[i]] = h
    taps["embedding"] = torch.flatten(h, 1)
    return taps


def test_channels_last_convnet_matches_the_old_computation_forward_and_backward():
    torch.manual_seed(0)
    net = create("convnet", 1, 10, 28, width=32, norm="instance").to(memory_format=CL)
    assert all(layer.inplace for layer in net.features if isinstance(layer, nn.ReLU))
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    x = torch.randn(5, 1, 28, 28)
    names = ("block0", "block1", "block2", "embedding")
    x_new = x.clone().requires_grad_(True)
    new = net.forward_taps(x_new, names)
    x_old = x.clone().requires_grad_(True)
    old = _old_taps(net, x_old)
    for name in names:
        assert torch.allclose(new[name], old[name], atol=1e-5, rtol=0), name
    # the gradient reaching the images, as the matching loss sends it back through every layer
    weights = torch.randn_like(new["embedding"])
    (new["embedding"] * weights).sum().backward()
    (old["embedding"] * weights).sum().backward()
    assert torch.allclose(x_new.grad, x_old.grad, atol=1e-5, rtol=1e-4)
    assert not torch.equal(x_new.grad, torch.zeros_like(x_new.grad))


def test_instance_norm_without_gradients_keeps_small_channels_last_maps_and_agrees_with_group_norm():
    torch.manual_seed(0)
    norm = nn.GroupNorm(128, 128)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    for size in (16, 8, 4, 1):
        x = (torch.randn(6, 128, size, size) * 3 + 1).contiguous(memory_format=CL)
        with torch.no_grad():
            fast = run_norm(norm, x)
            reference = norm(x.contiguous())
        assert fast.is_contiguous(memory_format=CL), size
        assert torch.allclose(fast, reference, atol=2e-5, rtol=0), size
    # bf16 maps (autocast): statistics in fp32, the output rounded once, like GroupNorm's kernel
    x = (torch.randn(6, 128, 16, 16) * 3 + 1).to(torch.bfloat16).contiguous(memory_format=CL)
    with torch.no_grad():
        fast, reference = run_norm(norm, x), norm.to(torch.float32)(x.float().contiguous()).to(torch.bfloat16)
    assert fast.dtype == torch.bfloat16
    assert float((fast.float() - reference.float()).abs().max()) <= 2 ** -7 * float(reference.float().abs().max())
    # with gradients, and for other norms, the layer itself runs (after the layout copy)
    x = torch.randn(2, 128, 8, 8).contiguous(memory_format=CL)
    assert run_norm(norm, x).is_contiguous()
    with torch.no_grad():
        assert run_norm(nn.GroupNorm(4, 128), x).is_contiguous()


def test_channels_last_convnet_without_gradients_matches_the_standard_layout():
    torch.manual_seed(0)
    net = create("convnet", 1, 10, 28, width=32, norm="instance")
    for layer in net.features:
        if isinstance(layer, nn.GroupNorm):
            nn.init.normal_(layer.weight)
            nn.init.normal_(layer.bias)
    fast = create("convnet", 1, 10, 28, width=32, norm="instance")
    fast.load_state_dict(net.state_dict())
    fast = fast.to(memory_format=CL)
    x = torch.randn(5, 1, 28, 28)
    names = ("block0", "block1", "block2", "embedding", "logits")
    with torch.no_grad():
        reference = net.forward_taps(x, names)
        got = fast.forward_taps(x.contiguous(memory_format=CL), names)
    for name in names:
        assert torch.allclose(got[name], reference[name], atol=1e-5, rtol=1e-5), name


def test_the_2x2_average_pool_agrees_with_pytorchs_forward_and_backward():
    from ddkit.models.base import AvgPool2x2

    torch.manual_seed(0)
    pool = AvgPool2x2()
    assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == 2 and pool.stride == 2
    for shape in ((3, 5, 8, 8), (2, 4, 32, 16), (2, 3, 7, 6), (1, 2, 2, 2)):
        for layout in (torch.contiguous_format, CL):
            x = torch.randn(shape).contiguous(memory_format=layout)
            mine, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            out_mine, out_theirs = pool(mine), nn.functional.avg_pool2d(theirs, 2, 2)
            assert out_mine.shape == out_theirs.shape
            assert torch.allclose(out_mine, out_theirs, atol=1e-6, rtol=0), (shape, layout)
            weights = torch.randn_like(out_theirs)
            (out_mine * weights).sum().backward()
            (out_theirs * weights).sum().backward()
            assert torch.allclose(mine.grad, theirs.grad, atol=1e-6, rtol=0), (shape, layout)
            if shape[2] % 2 == 0 and shape[3] % 2 == 0:  # ddkit's own backward: a quarter of each gradient
                assert torch.equal(mine.grad, theirs.grad), (shape, layout)
