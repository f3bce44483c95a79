"""Building blocks of the statistics-matching family (SRe2L, CDA, G-VBSM).

Models (mobilenetv2, wrn / wrn16_2, shufflenetv2), batched crops / flips / jitter and the CDA
schedule, padded crops, and the statistics losses (BN, patch, cell, EMA, densification). Tiny tensors
only.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddkit.augment import (
    CropParams,
    apply_crops,
    apply_padded_crops,
    augment_batch,
    apply_flips,
    apply_jitter,
    cda_min_scale,
    jitter_roll,
    random_flip,
    random_resized_crop,
    sample_crops,
    sample_jitter,
    sample_padded_crops,
)
from ddkit.errors import DDKitError
from ddkit.losses import (
    ConvStatistics,
    bn_matching_loss,
    bn_statistics,
    cell_statistics,
    conv_statistics,
    conv_statistics_distance,
    densification_loss,
    ema_statistic,
    patch_statistics,
    statistic_distance,
)
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


# ==================================================================================================
# crops, flips, jitter, CDA
# ==================================================================================================


def test_crop_boxes_inside_and_area_within_scale():
    scale = (0.2, 0.6)
    p = sample_crops(400, (32, 24), gen(), scale=scale)
    assert len(p) == 400 and not p.shared and p.image_size == (32, 24)
    assert p.top.dtype == torch.int64 and p.flip.dtype == torch.bool
    assert (p.top >= 0).all() and (p.left >= 0).all()
    assert (p.height >= 1).all() and (p.width >= 1).all()
    assert (p.top + p.height <= 32).all() and (p.left + p.width <= 24).all()
    # h, w are rounded: allow half a pixel on each side
    hi = (p.height + 0.5) * (p.width + 0.5) / (32 * 24)
    lo = (p.height - 0.5) * (p.width - 0.5) / (32 * 24)
    assert (hi >= scale[0]).all() and (lo <= scale[1]).all()
    aspect = p.width / p.height
    assert aspect.min() > 0.5 and aspect.max() < 2.0
    assert len(set(map(tuple, p.boxes().tolist()))) > 200  # varied
    assert 0.35 < p.flip.float().mean() < 0.65


def test_crop_fallback_is_centre_crop():
    # aspect 3..4 cannot fit a 90 % area box in an 8x8 image: every try fails
    p = sample_crops(3, 8, gen(), scale=(0.9, 1.0), ratio=(3.0, 4.0))
    assert p.height.tolist() == [3, 3, 3] and p.width.tolist() == [8, 8, 8]
    assert p.top.tolist() == [2, 2, 2] and p.left.tolist() == [0, 0, 0]


def test_crop_sampling_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = sample_crops(16, 32, gen(5))
    b = sample_crops(16, 32, gen(5))
    assert torch.equal(a.boxes(), b.boxes()) and torch.equal(a.flip, b.flip)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_crop_replay_identical():
    x = torch.randn(6, 3, 16, 16, generator=gen(1))
    p = sample_crops(6, 16, gen(2))
    assert torch.equal(apply_crops(x, p, 16), apply_crops(x, p, 16))
    q = CropParams(*(t.clone() for t in (p.top, p.left, p.height, p.width, p.flip)), (16, 16))
    assert torch.equal(apply_crops(x, p, 12), apply_crops(x, q, 12))
    # one sample's record replays that sample's crop
    one = apply_crops(x[3:4], p.select(3), 16)
    assert torch.allclose(one, apply_crops(x, p, 16)[3:4], atol=1e-6)


def test_crop_shared_vs_per_sample():
    x = torch.randn(5, 2, 16, 16, generator=gen(1))
    shared = sample_crops(5, 16, gen(3), per_sample=False)
    assert len(shared) == 1 and shared.shared
    out = apply_crops(x, shared, 16)
    for i in range(5):
        assert torch.allclose(out[i : i + 1], apply_crops(x[i : i + 1], shared, 16), atol=1e-6)
    assert torch.allclose(apply_crops(x, shared.expand(5), 16), out, atol=1e-6)
    per = sample_crops(5, 16, gen(3), per_sample=True)
    assert len(per) == 5 and len(set(map(tuple, per.boxes().tolist()))) > 1
    with pytest.raises(DDKitError):
        apply_crops(x, sample_crops(3, 16, gen()), 16)


def test_crop_identity_and_exact_boxes():
    x = torch.randn(3, 2, 8, 12, generator=gen(1))
    full = CropParams(*(torch.tensor([v]) for v in (0, 0, 8, 12)), torch.tensor([False]), (8, 12))
    assert torch.allclose(apply_crops(x, full, (8, 12)), x, atol=1e-5)
    flip1 = torch.tensor([True])
    flipped = CropParams(full.top, full.left, full.height, full.width, flip1, (8, 12))
    assert torch.allclose(apply_crops(x, flipped, (8, 12)), x.flip(3), atol=1e-5)
    # a box resized to its own size is the pixel slice
    flips = torch.tensor([False, True])
    box = CropParams(*(torch.tensor([v, v]) for v in (2, 5, 4, 6)), flips, (8, 12))
    out = apply_crops(x[:2], box, (4, 6))
    assert torch.allclose(out[0], x[0, :, 2:6, 5:11], atol=1e-5)
    assert torch.allclose(out[1], x[1, :, 2:6, 5:11].flip(2), atol=1e-5)
    # upsampling a 1-pixel-wide box gives that column everywhere (nothing leaks in from outside)
    col = CropParams(*(torch.tensor([v]) for v in (0, 7, 8, 1)), torch.tensor([False]), (8, 12))
    up = apply_crops(x, col, (8, 4))
    assert torch.allclose(up, x[:, :, :, 7:8].expand(-1, -1, -1, 4), atol=1e-5)


def test_crop_equals_slice_then_interpolate():
    x = torch.randn(6, 2, 16, 12, generator=gen(4), dtype=torch.float64)
    p = sample_crops(6, (16, 12), gen(8), scale=(0.08, 1.0))
    for out_size in ((16, 12), (5, 7)):  # enlarge and shrink
        out = apply_crops(x, p, out_size)
        for i in range(6):
            t, l, h, w = p.boxes()[i].tolist()
            box = x[i : i + 1, :, t : t + h, l : l + w]
            ref = F.interpolate(
                box, size=out_size, mode="bilinear", align_corners=False, antialias=False
            )
            ref = ref.flip(3) if p.flip[i] else ref
            assert torch.allclose(out[i : i + 1], ref, atol=1e-9)


def test_crop_is_differentiable_and_convenience_wrapper():
    x = torch.randn(4, 3, 16, 16, generator=gen(1), requires_grad=True)
    out, p = random_resized_crop(x, gen(2), scale=(0.5, 1.0))
    assert out.shape == x.shape and len(p) == 1
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(DDKitError):
        apply_crops(torch.randn(4, 3, 8, 8), p, 8)  # drawn for 16 px


def test_crop_bad_arguments():
    bad = (dict(scale=(0.5, 0.2)), dict(scale=(0.0, 1.0)), dict(ratio=(1.0,)), dict(flip_prob=2.0))
    for kwargs in bad:
        with pytest.raises(DDKitError):
            sample_crops(4, 16, gen(), **kwargs)
    with pytest.raises(DDKitError):
        sample_crops(0, 16, gen())
    with pytest.raises(DDKitError):
        sample_crops(4, 16, None)


def test_flips():
    x = torch.randn(4, 2, 5, 6, generator=gen(1))
    assert torch.equal(random_flip(x, gen(), p=1.0), x.flip(3))
    assert torch.equal(random_flip(x, gen(), p=0.0), x)
    mask = torch.tensor([True, False, False, True])
    out = apply_flips(x, mask)
    assert torch.equal(out[0], x[0].flip(2)) and torch.equal(out[1], x[1])
    shared = random_flip(x, gen(7), per_sample=False)
    assert torch.equal(shared, x) or torch.equal(shared, x.flip(3))


def test_jitter_roll_matches_torch_roll():
    x = torch.arange(2 * 1 * 6 * 7, dtype=torch.float32).reshape(2, 1, 6, 7)
    dy, dx = sample_jitter(3, gen(11))
    assert torch.equal(jitter_roll(x, 3, gen(11)), torch.roll(x, (dy, dx), dims=(2, 3)))
    assert torch.equal(apply_jitter(x, (2, -1)), torch.roll(x, (2, -1), dims=(2, 3)))
    assert apply_jitter(x, (2, -1))[0, 0, 2, 0].item() == x[0, 0, 0, 1].item()  # down 2, left 1
    g = gen(0)
    draws = torch.tensor([sample_jitter(2, g) for _ in range(300)])
    assert draws.min() == -2 and draws.max() == 2
    draws = torch.tensor([sample_jitter(2, g, mode="positive") for _ in range(300)])
    assert draws.min() == 0 and draws.max() == 2  # the published random.randint(0, J)
    with pytest.raises(DDKitError, match="jitter mode"):
        sample_jitter(2, g, mode="both")
    assert jitter_roll(x, 0, gen()) is x
    with pytest.raises(DDKitError):
        jitter_roll(x, -1, gen())


def test_cda_schedule_hand_values():
    T, M = 100, 0.5  # milestone at t = 50
    for mode in ("cosine", "linear", "step"):
        assert cda_min_scale(50, T, M, mode) == pytest.approx(0.08)
        assert cda_min_scale(100, T, M, mode) == pytest.approx(0.08)
    assert cda_min_scale(0, T, M, "step") == 1.0
    assert cda_min_scale(0, T, M, "linear") == pytest.approx(1.0)
    assert cda_min_scale(0, T, M, "cosine") == pytest.approx(1.0)
    assert cda_min_scale(25, T, M, "step") == 1.0
    assert cda_min_scale(25, T, M, "linear") == pytest.approx(0.54)  # 0.08 + 0.92 * 0.5
    assert cda_min_scale(25, T, M, "cosine") == pytest.approx(0.54)  # cos(pi/2) = 0
    # a quarter of the way with M = 1:
    # linear 0.08 + 0.92 * 0.75, cosine 0.08 + 0.92 * (1 + 1/sqrt2) / 2
    assert cda_min_scale(25, 100, 1.0, "linear") == pytest.approx(0.77)
    assert cda_min_scale(25, 100, 1.0, "cosine") == pytest.approx(0.8652691193458119)
    assert cda_min_scale(49, T, M, "step") == 1.0
    assert cda_min_scale(0, T, 0.0, "cosine") == pytest.approx(0.08)  # M = 0: no curriculum
    assert cda_min_scale(99, 100) == pytest.approx(0.08 + 0.92 * (1 + math.cos(math.pi * 0.99)) / 2)


@pytest.mark.parametrize(
    "args",
    [(0, 100, 1.0, "exp"), (0, 100, 1.5, "cosine"), (0, 100, -0.1, "linear"), (0, 0, 1.0, "step")],
)
def test_cda_schedule_errors(args):
    with pytest.raises(DDKitError):
        cda_min_scale(*args)


# ==================================================================================================
# statistics losses
# ==================================================================================================


def _by_hand_stats(x):
    flat = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)
    mean = flat.mean(1)
    var = ((flat - mean[:, None]) ** 2).mean(1)
    return mean, var


def test_bn_statistics_biased():
    x = torch.randn(3, 4, 5, 2, generator=gen(1), dtype=torch.float64)
    mean, var = bn_statistics(x)
    m, v = _by_hand_stats(x)
    assert torch.allclose(mean, m) and torch.allclose(var, v)
    with pytest.raises(DDKitError):
        bn_statistics(torch.randn(3, 4))


def test_bn_matching_loss_closed_form_and_norms():
    g = gen(2)
    f64 = dict(generator=g, dtype=torch.float64)
    xs = [torch.randn(2, 3, 4, 4, **f64), torch.randn(2, 5, 2, 2, **f64)]
    targets = [(torch.randn(c, **f64), torch.rand(c, **f64)) for c in (3, 5)]
    stats = [bn_statistics(x) for x in xs]
    hand = [_by_hand_stats(x) for x in xs]

    def dist(a, b, norm):
        d = (a - b) ** 2
        return {"l2": d.sum().sqrt(), "l2sq": d.sum(), "mse": d.mean()}[norm]

    for norm in ("l2", "l2sq", "mse"):
        per_layer = [dist(m, t[0], norm) + dist(v, t[1], norm) for (m, v), t in zip(hand, targets)]
        expected = 10.0 * per_layer[0] + per_layer[1]
        got = bn_matching_loss(stats, targets, norm=norm)
        assert got.dim() == 0 and torch.allclose(got, expected)
        got1 = bn_matching_loss(stats, targets, first_multiplier=1.0, norm=norm)
        assert torch.allclose(got - got1, 9.0 * per_layer[0])
    with pytest.raises(DDKitError):
        bn_matching_loss(stats, targets[:1])
    with pytest.raises(DDKitError):
        bn_matching_loss(stats, targets, norm="l1")
    with pytest.raises(DDKitError):
        bn_matching_loss(stats, [targets[1], targets[0]])  # shapes swapped


def test_bn_matching_loss_gradient_flows_to_images_only():
    x = torch.randn(2, 3, 4, 4, generator=gen(), requires_grad=True)
    rm = torch.zeros(3, requires_grad=True)
    loss = bn_matching_loss([bn_statistics(x)], [(rm, torch.ones(3))])
    loss.backward()
    assert x.grad.abs().sum() > 0 and rm.grad is None
    z = torch.zeros(3, requires_grad=True)
    statistic_distance(z, torch.zeros(3)).backward()
    assert torch.equal(z.grad, torch.zeros(3))  # no NaN at a zero difference


def test_cell_statistics_vs_loop():
    x = torch.randn(3, 2, 8, 4, generator=gen(3), dtype=torch.float64)
    cells = 2
    mean, var = cell_statistics(x, cells)
    assert mean.shape == var.shape == (2, 2, 2)
    ph, pw = 8 // cells, 4 // cells
    for c in range(2):
        for i in range(cells):
            for j in range(cells):
                patch = x[:, c, i * ph : (i + 1) * ph, j * pw : (j + 1) * pw].reshape(-1)
                assert torch.allclose(mean[c, i, j], patch.mean())
                assert torch.allclose(var[c, i, j], ((patch - patch.mean()) ** 2).mean())
    m1, v1 = cell_statistics(x, 1)
    m, v = bn_statistics(x)
    assert torch.allclose(m1.reshape(-1), m) and torch.allclose(v1.reshape(-1), v)


def test_cell_statistics_bad_cells():
    with pytest.raises(DDKitError, match="does not fit the feature map"):
        cell_statistics(torch.randn(2, 3, 6, 6), 4)
    with pytest.raises(DDKitError):
        cell_statistics(torch.randn(2, 3, 8, 8), 0)


def test_patch_statistics_pool_batch_and_channels_after_resizing_up():
    x = torch.randn(3, 2, 6, 9, generator=gen(4), dtype=torch.float64)
    mean, var = patch_statistics(x, 4)
    # 6 x 9 is resized to 8 x 12: a 2 x 3 grid of 4 x 4-pixel patches, row-major
    assert mean.shape == var.shape == (6,)
    resized = F.interpolate(x, size=(8, 12), mode="bilinear", align_corners=False)
    for p in range(6):
        u, v = divmod(p, 3)
        values = resized[:, :, 4 * u:4 * u + 4, 4 * v:4 * v + 4].reshape(-1)  # every sample and channel
        assert torch.allclose(mean[p], values.mean()) and torch.allclose(var[p], values.var(unbiased=False))
    exact = torch.randn(2, 3, 8, 8, generator=gen(5), dtype=torch.float64)
    m, v = patch_statistics(exact, 8)  # one patch of a map that needs no resize: all values
    assert torch.allclose(m, exact.mean().reshape(1)) and torch.allclose(v, exact.var(unbiased=False).reshape(1))
    with pytest.raises(DDKitError):
        patch_statistics(exact, 0)


def test_ema_statistic_forward_value_and_gradient():
    p = torch.randn(4, generator=gen(1), dtype=torch.float64, requires_grad=True)
    s = p**2 + 1.0  # a statistic depending on the "images" p
    ema = torch.randn(4, generator=gen(2), dtype=torch.float64)
    alpha = 0.8
    value, ema_new = ema_statistic(s, ema, alpha)
    expected = alpha * ema + (1 - alpha) * s.detach()
    assert torch.allclose(value, expected) and torch.allclose(ema_new, expected)
    assert not ema_new.requires_grad and value.requires_grad
    w = torch.randn(4, generator=gen(3), dtype=torch.float64)
    (g_value,) = torch.autograd.grad((w * value).sum(), p, retain_graph=True)
    (g_s,) = torch.autograd.grad((w * (p**2 + 1.0)).sum(), p)
    assert torch.allclose(g_value, g_s)  # d value / d s = identity
    # the loss is evaluated at the EMA: gradient of ||t - value|| is (value - t)/||.|| * ds/dp
    t = torch.zeros(4, dtype=torch.float64)
    (g_loss,) = torch.autograd.grad(statistic_distance(value, t), p)
    unit = (expected - t) / (expected - t).norm()
    assert torch.allclose(g_loss, unit * 2 * p.detach())
    # first call: the statistic itself
    v0, e0 = ema_statistic(s, None, alpha)
    assert torch.equal(v0.detach(), s.detach()) and torch.equal(e0, s.detach())
    with pytest.raises(DDKitError):
        ema_statistic(s, ema, 1.5)
    with pytest.raises(DDKitError):
        ema_statistic(s, torch.zeros(3), 0.5)


def test_conv_statistics_distance_composes_with_ema():
    g = gen(4)
    x = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    stats = conv_statistics(x, 2, form="cells")
    reference = conv_statistics(x, 2)
    assert stats.patch_mean.shape == (3, 2, 2) and reference.patch_mean.shape == (4,)
    assert conv_statistics(x).patch_mean is None
    target = ConvStatistics(torch.zeros(3), torch.ones(3), torch.zeros(3, 2, 2), torch.ones(3, 2, 2))

    def d(a, b):
        return (a - b).reshape(-1).norm()

    expected = d(stats.mean, 0) + d(stats.var, 1) + d(stats.patch_mean, 0) + d(stats.patch_var, 1)
    assert torch.allclose(conv_statistics_distance(stats, target), expected)
    no_patch = ConvStatistics(torch.zeros(3), torch.ones(3))  # a target without patch statistics
    assert torch.allclose(conv_statistics_distance(stats, no_patch), d(stats.mean, 0) + d(stats.var, 1))
    # EMA values slot in through _replace
    v, _ = ema_statistic(stats.mean, torch.zeros(3), 0.8)
    conv_statistics_distance(stats._replace(mean=v), target).backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(DDKitError):
        conv_statistics(x, 2, form="grid")


def test_ema_zero_start_is_the_published_codes_first_value():
    s = torch.tensor([1.0, 2.0])
    value, ema = ema_statistic(s, None, 0.8, start="zero")
    assert torch.allclose(value, 0.2 * s) and torch.allclose(ema, 0.2 * s)
    with pytest.raises(DDKitError):
        ema_statistic(s, None, 0.8, start="one")


def test_padded_crops_equal_torchvision_randomcrop_with_padding():
    x = torch.randn(5, 3, 6, 7, generator=gen(8), dtype=torch.float64)
    params = sample_padded_crops(5, (6, 7), gen(9), padding=2, per_sample=True, flip_prob=0.5)
    assert params.top.abs().max() <= 2 and params.left.abs().max() <= 2
    fill = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
    out = apply_padded_crops(x, params, fill)
    for i in range(5):  # pad, then cut the window at (top + pad, left + pad), then flip
        padded = torch.stack([F.pad(x[i, c], (2, 2, 2, 2), value=float(fill[c])) for c in range(3)])
        t, left = int(params.top[i]) + 2, int(params.left[i]) + 2
        window = padded[:, t:t + 6, left:left + 7]
        assert torch.equal(out[i], window.flip(2) if params.flip[i] else window)
    shared = sample_padded_crops(5, (6, 7), gen(9), padding=2, per_sample=False)
    assert len(shared) == 1 and apply_padded_crops(x, shared).shape == x.shape
    draws = sample_padded_crops(400, 8, gen(1), padding=4)
    assert draws.top.min() == -4 and draws.top.max() == 4
    y = x.clone().requires_grad_(True)
    apply_padded_crops(y, params).sum().backward()
    assert y.grad.abs().sum() > 0
    with pytest.raises(DDKitError):
        apply_padded_crops(x, sample_padded_crops(5, 8, gen(), 2))  # drawn for another size
    with pytest.raises(DDKitError):
        sample_padded_crops(5, 8, gen(), -1)


def test_augment_batch_crops_flips_and_rolls_from_one_generator():
    x = torch.randn(4, 1, 8, 8, generator=gen(2))
    a = augment_batch(x, gen(3), "padded", 0.5, True, padding=2, jitter=3)
    b = augment_batch(x, gen(3), "padded", 0.5, True, padding=2, jitter=3)
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert torch.equal(augment_batch(x, gen(), "none", 0.0, True), x)
    with pytest.raises(DDKitError, match="crop"):
        augment_batch(x, gen(), "random", 0.5)


def test_densification_matches_independent_computation():
    g = gen(5)
    images = torch.randn(5, 2, 6, 6, generator=g, dtype=torch.float64) * 0.3
    labels = torch.tensor([0, 1, 0, 0, 2])  # class 1 and 2 have one image: skipped
    z = F.adaptive_avg_pool2d(images[labels == 0], 3).flatten(1)
    lam = torch.linalg.svdvals(z) ** 2  # eigenvalues of Z Z^T
    p = torch.softmax(lam / 4.0, 0)
    expected = (p * (p.log() - torch.log_softmax(lam, 0))).sum()
    got = densification_loss(images, labels, pool_size=3)
    assert got.dim() == 0 and torch.allclose(got, expected)  # one-image classes add 0 to the sum
    assert densification_loss(images, torch.arange(5), pool_size=3) == 0  # no class with >= 2
    two = densification_loss(images, torch.tensor([0, 1, 0, 1, 1]), pool_size=3)
    assert torch.allclose(densification_loss(images, torch.tensor([0, 1, 0, 1, 1]), 3, reduction="mean"), two / 2)


def test_densification_gradient_flattens_a_collinear_class_spectrum():
    g = gen(12)
    base = torch.randn(1, 1, 4, 4, generator=g, dtype=torch.float64)
    images = (0.3 * base + 0.05 * torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    labels = torch.zeros(4, dtype=torch.long)

    def spectrum(x):
        z = x.flatten(1)
        return torch.softmax(torch.linalg.eigvalsh(z @ z.T), 0)

    densification_loss(images, labels, pool_size=4).backward()
    with torch.no_grad():
        stepped = images - 0.05 * images.grad
    entropy = lambda p: -(p * p.log()).sum()  # noqa: E731
    assert entropy(spectrum(stepped)) > entropy(spectrum(images.detach()))  # the class spreads out


def test_densification_step_lowers_low_rank_loss():
    g = gen(6)
    base = torch.randn(2, 1, 3, 8, 8, generator=g) * 0.1
    images = (base + 0.01 * torch.randn(2, 4, 3, 8, 8, generator=g)).reshape(8, 3, 8, 8)
    images.requires_grad_(True)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    loss = densification_loss(images, labels, pool_size=4)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with torch.no_grad():
        stepped = images - 1.0 * images.grad
    after = densification_loss(stepped, labels, pool_size=4)
    assert torch.isfinite(after) and after < loss
    with pytest.raises(DDKitError):
        densification_loss(images, labels[:3])


def test_densification_normalize_option_works_at_image_scale():
    g = gen(7)
    # unit-variance 3 x 16 x 16 images, nearly identical: raw eigenvalues are in the hundreds
    base = torch.randn(1, 3, 16, 16, generator=g)
    images = (base + 0.05 * torch.randn(4, 3, 16, 16, generator=g)).requires_grad_(True)
    labels = torch.zeros(4, dtype=torch.long)
    assert densification_loss(images, labels, pool_size=8) < 1e-6  # saturated softmaxes
    loss = densification_loss(images, labels, pool_size=8, normalize=True)
    assert loss > 0.1
    loss.backward()
    with torch.no_grad():
        stepped = images - 10.0 * images.grad
    assert densification_loss(stepped, labels, pool_size=8, normalize=True) < loss
