"""The statistics losses of SRe2L, CDA and G-VBSM: BN, cell and patch statistics, EMA, densification. Tiny tensors only."""

import pytest
import torch
import torch.nn.functional as F

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


def test_bn_statistics_row_reduction_equals_var_mean_in_values_and_gradients():
    """The CPU fast path (two passes over the [N, C, H*W] rows) against torch.var_mean, the general
    path (channels-last input), with a large mean that E[x^2] - E[x]^2 would lose to cancellation."""
    x = (torch.randn(6, 5, 7, 3, generator=gen(4)) * 0.1 + 100.0).requires_grad_()
    mean, var = bn_statistics(x)
    (mean.sum() * 0.3 + var.sum()).backward()
    grad, x.grad = x.grad.clone(), None
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    general_mean, general_var = bn_statistics(x_cl)
    (general_mean.sum() * 0.3 + general_var.sum()).backward()
    exact_var, exact_mean = torch.var_mean(x.detach().double(), dim=(0, 2, 3), correction=0)
    assert torch.allclose(mean.double(), exact_mean, rtol=1e-6) and torch.allclose(var.double(), exact_var, rtol=1e-4)
    assert torch.allclose(var, general_var, rtol=1e-4) and torch.allclose(grad, x_cl.grad, rtol=1e-4, atol=1e-6)
    constant = torch.zeros(2, 3, 4, 4, requires_grad=True)
    m, v = bn_statistics(constant)
    (m.sum() + v.sum()).backward()
    assert torch.equal(v, torch.zeros(3)) and torch.isfinite(constant.grad).all()


def test_patch_statistics_row_reduction_equals_var_mean_in_values_and_gradients():
    """The CPU path (one row per patch, two passes) against torch.var_mean over dims (0, 1, 3, 5),
    in float64 for the values, with a large mean; a map that is resized first takes it too."""
    for shape in ((3, 5, 8, 12), (2, 3, 7, 7)):
        x = (torch.randn(*shape, generator=gen(5)) * 0.1 + 100.0).requires_grad_()
        mean, var = patch_statistics(x, 4)
        (mean.sum() * 0.3 + var.sum()).backward()
        resized = F.interpolate(x.detach().double(), size=(-(-shape[2] // 4) * 4, -(-shape[3] // 4) * 4),
                                mode="bilinear", align_corners=False).requires_grad_()
        n, c, h, w = resized.shape
        exact_var, exact_mean = torch.var_mean(resized.reshape(n, c, h // 4, 4, w // 4, 4), dim=(0, 1, 3, 5),
                                               correction=0)
        assert torch.allclose(mean.double(), exact_mean.reshape(-1), rtol=1e-6)
        assert torch.allclose(var.double(), exact_var.reshape(-1), rtol=1e-4)
        (exact_mean.sum() * 0.3 + exact_var.sum()).backward()
        if (h, w) == tuple(shape[2:]):
            assert torch.allclose(x.grad.double(), resized.grad, rtol=1e-3, atol=1e-6)


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
