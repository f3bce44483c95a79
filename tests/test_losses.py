"""Tests for ddkit.losses: each loss against a hand value or a naive Python loop (float64)."""

import math

import pytest
import torch

from ddkit.errors import DDKitError
from ddkit.losses import (
    check_grouped,
    class_aware_ce_loss,
    class_centralization_loss,
    gram_loss,
    icd_neighbours,
    intra_class_kl_loss,
    local_covariance_loss,
    mean_feature_loss,
    moment_loss,
)

D64 = torch.float64


def rand(*shape, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=D64)
    return t.requires_grad_(grad)


# --------------------------------------------------------------------------------------------------
# naive reference implementations (plain Python over nested lists)
# --------------------------------------------------------------------------------------------------


def spatial(x):
    """[K, N, C, H, W] tensor -> nested lists [k][n][c][p]."""
    return x.detach().flatten(3).tolist()


def loop_moment(real_layers, syn_layers, eps, unbiased=True):
    total = 0.0
    for real, syn in zip(real_layers, syn_layers):
        stats = []
        for x in (spatial(real), spatial(syn)):
            per_class = []
            for samples in x:
                n, c, p = len(samples), len(samples[0]), len(samples[0][0])
                mus, sds = [], []
                for ch in range(c):
                    avg = [sum(samples[i][ch][q] for i in range(n)) / n for q in range(p)]
                    mu = sum(avg) / p
                    var = sum((a - mu) ** 2 for a in avg) / (p - 1 if unbiased else p)
                    mus.append(mu)
                    sds.append(math.sqrt(var + eps))
                per_class.append((mus, sds))
            stats.append(per_class)
        mse_mu = mse_sd = 0.0
        for (mr, sr), (ms, ss) in zip(*stats):
            c = len(mr)
            mse_mu += sum((ms[j] - mr[j]) ** 2 for j in range(c)) / c
            mse_sd += sum((ss[j] - sr[j]) ** 2 for j in range(c)) / c
        total += (mse_mu + mse_sd) / 2
    return total / len(real_layers)


def loop_mean_gram(samples):
    n, c, p = len(samples), len(samples[0]), len(samples[0][0])
    g = [[0.0] * c for _ in range(c)]
    for s in samples:
        for i in range(c):
            for j in range(c):
                g[i][j] += sum(s[i][q] * s[j][q] for q in range(p)) / (c * p) / n
    return g


def loop_gram(real_layers, syn_layers):
    total = 0.0
    for real, syn in zip(real_layers, syn_layers):
        layer = 0.0
        for rs, ss in zip(spatial(real), spatial(syn)):
            gr, gs = loop_mean_gram(rs), loop_mean_gram(ss)
            layer += sum((gs[i][j] - gr[i][j]) ** 2 for i in range(len(gr)) for j in range(len(gr)))
        total += layer
    return total / len(real_layers)


def loop_cov(samples):
    n, c, p = len(samples), len(samples[0]), len(samples[0][0])
    mean = [[sum(samples[i][ch][q] for i in range(n)) / n for q in range(p)] for ch in range(c)]
    sig = [[0.0] * c for _ in range(c)]
    for s in samples:
        f = [[s[ch][q] - mean[ch][q] for q in range(p)] for ch in range(c)]
        for i in range(c):
            for j in range(c):
                sig[i][j] += sum(f[i][q] * f[j][q] for q in range(p)) / n
    return sig


def loop_local_cov(real, syn):
    total = 0.0
    for rs, ss in zip(spatial(real), spatial(syn)):
        a, b = loop_cov(rs), loop_cov(ss)
        total += sum((a[i][j] - b[i][j]) ** 2 for i in range(len(a)) for j in range(len(a)))
    return total


def loop_log_softmax(v):
    m = max(v)
    lse = m + math.log(sum(math.exp(x - m) for x in v))
    return [x - lse for x in v]


def loop_icd(emb, k, max_kl):
    total = 0.0
    for samples in emb.detach().tolist():
        vals = []
        n = len(samples)
        for i in range(n):
            dists = sorted(
                (math.dist(samples[i], samples[j]), j) for j in range(n) if j != i
            )
            nbrs = [j for _, j in dists[:k]]
            m = [sum(samples[j][d] for j in nbrs) / k for d in range(len(samples[i]))]
            lp, lq = loop_log_softmax(samples[i]), loop_log_softmax(m)
            kl = sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))
            vals.append(-min(kl, max_kl))
        total += sum(vals) / len(vals)  # mean over a class's samples, sum over classes
    return total


# --------------------------------------------------------------------------------------------------
# mean_feature_loss
# --------------------------------------------------------------------------------------------------


def test_mean_feature_hand_value():
    real = torch.tensor([[[1, 2], [3, 4]], [[0, 0], [2, 2]]], dtype=D64)  # means [2,3], [1,1]
    syn = torch.tensor([[[0, 0], [0, 0]], [[1, 3], [3, 3]]], dtype=D64)  # means [0,0], [2,3]
    # class 0: 2^2 + 3^2 = 13; class 1: 1^2 + 2^2 = 5
    assert mean_feature_loss(real, syn).item() == pytest.approx(18.0)


def test_mean_feature_zero_at_batch_means_and_flattens():
    real = rand(2, 3, 4)
    syn = real.mean(dim=1, keepdim=True).expand(2, 5, 4).clone()
    assert mean_feature_loss(real, syn).item() == pytest.approx(0.0, abs=1e-24)
    r5, s5 = rand(2, 3, 2, 2, 2, seed=1), rand(2, 4, 2, 2, 2, seed=2)
    flat = mean_feature_loss(r5.flatten(2), s5.flatten(2))
    assert torch.allclose(mean_feature_loss(r5, s5), flat)


def test_mean_feature_gradient_is_analytic():
    real, syn = rand(2, 3, 4), rand(2, 5, 4, seed=1, grad=True)
    loss = mean_feature_loss(real, syn)
    assert loss.dim() == 0
    loss.backward()
    expected = 2 * (syn.detach().mean(1, keepdim=True) - real.mean(1, keepdim=True)) / 5
    assert torch.allclose(syn.grad, expected.expand_as(syn))


def test_real_inputs_get_no_grad_and_dtype_is_aligned():
    real = rand(2, 3, 4).float().requires_grad_(True)
    syn = rand(2, 2, 4, seed=1, grad=True)
    loss = mean_feature_loss(real, syn)
    assert loss.dtype == D64
    loss.backward()
    assert real.grad is None and syn.grad is not None


# --------------------------------------------------------------------------------------------------
# moment_loss / gram_loss
# --------------------------------------------------------------------------------------------------


def layers(seed, n):
    return [rand(2, n, 2, 2, 2, seed=seed), rand(2, n, 3, 2, 1, seed=seed + 1)]


@pytest.mark.parametrize("unbiased", [True, False])
def test_moment_loss_matches_loop(unbiased):
    real, syn = layers(0, 3), layers(10, 2)
    got = moment_loss(real, syn, eps=1e-5, unbiased=unbiased)
    assert got.dim() == 0
    assert got.item() == pytest.approx(loop_moment(real, syn, 1e-5, unbiased), rel=1e-12)
    single = moment_loss(real[0], syn[0])  # a bare tensor is one layer
    assert single.item() == pytest.approx(loop_moment(real[:1], syn[:1], 1e-5), rel=1e-12)


def test_gram_loss_matches_loop():
    real, syn = layers(0, 3), layers(10, 2)
    got = gram_loss(real, syn)
    assert got.dim() == 0
    assert got.item() == pytest.approx(loop_gram(real, syn), rel=1e-12)


def test_moment_and_gram_zero_for_identical_and_differentiable():
    real = layers(0, 3)
    syn = [t.clone().requires_grad_(True) for t in real]
    for fn in (moment_loss, gram_loss):
        loss = fn(real, syn)
        assert loss.item() == pytest.approx(0.0, abs=1e-20)
    syn2 = [t.clone().requires_grad_(True) for t in layers(10, 2)]
    (moment_loss(real, syn2) + gram_loss(real, syn2)).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in syn2)


# --------------------------------------------------------------------------------------------------
# local_covariance_loss
# --------------------------------------------------------------------------------------------------


def test_local_covariance_matches_loop_both_layouts():
    real, syn = rand(2, 3, 2, 2, 2), rand(2, 4, 2, 2, 2, seed=1)
    got = local_covariance_loss(real, syn)
    assert got.dim() == 0
    assert got.item() == pytest.approx(loop_local_cov(real, syn), rel=1e-12)
    flat = local_covariance_loss(real.flatten(3), syn.flatten(3))  # [K, N, C, P]
    assert flat.item() == pytest.approx(got.item(), rel=1e-12)


def test_local_covariance_zero_and_shift_invariant():
    real = rand(2, 3, 2, 2, 2)
    assert local_covariance_loss(real, real.clone()).item() == pytest.approx(0.0, abs=1e-20)
    syn = rand(2, 4, 2, 2, 2, seed=1, grad=True)
    base = local_covariance_loss(real, syn)
    shift = rand(2, 1, 2, 2, 2, seed=5) * 10  # per class, channel, position
    assert local_covariance_loss(real + shift, syn + shift).item() == pytest.approx(
        base.item(), rel=1e-10
    )
    base.backward()
    assert torch.isfinite(syn.grad).all() and syn.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# class_centralization_loss
# --------------------------------------------------------------------------------------------------


def test_class_centralization_square_hand_values():
    emb = torch.tensor([[[0, 0], [2, 0]], [[1, 1], [1, 5]]], dtype=D64)
    # class 0: mean [1,0], d2 = 1, 1; class 1: mean [1,3], d2 = 4, 4
    assert class_centralization_loss(emb).item() == pytest.approx(10.0)
    # beta = 3: max(1-3,0)*2 + max(4-3,0)*2
    assert class_centralization_loss(emb, beta=3.0).item() == pytest.approx(2.0)


def test_class_centralization_zero_when_samples_coincide():
    emb = rand(3, 1, 4).expand(3, 5, 4).clone().requires_grad_(True)
    loss = class_centralization_loss(emb)
    assert loss.item() == pytest.approx(0.0, abs=1e-24)
    loss.backward()
    assert emb.grad.abs().max().item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.2])
def test_class_centralization_exp_matches_loop(beta):
    emb, t = rand(2, 3, 4) * 3, 0.02
    expected = 0.0
    for samples in emb.tolist():
        mu = [sum(s[d] for s in samples) / len(samples) for d in range(4)]
        for s in samples:
            d2 = sum((s[d] - mu[d]) ** 2 for d in range(4))
            expected += max(math.exp(t * d2) - beta, 0.0)
    got = class_centralization_loss(emb, form="exp", beta=beta, temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_class_centralization_exp_finite_for_far_samples():
    emb = (rand(2, 3, 4) * 1e3).requires_grad_(True)
    loss = class_centralization_loss(emb, form="exp")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# intra_class_kl_loss
# --------------------------------------------------------------------------------------------------


def test_icd_neighbour_rule():
    assert [icd_neighbours(i) for i in (1, 2, 3, 10, 50)] == [0, 1, 1, 2, 10]
    with pytest.raises(DDKitError):
        icd_neighbours(0)


@pytest.mark.parametrize("k", [None, 1, 2])
def test_icd_matches_loop(k):
    emb = rand(2, 5, 4, grad=True)
    kk = icd_neighbours(5) if k is None else k
    got = intra_class_kl_loss(emb, k=k, max_kl=50.0)
    assert got.dim() == 0
    assert got.item() == pytest.approx(loop_icd(emb, kk, 50.0), rel=1e-12)
    got.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_icd_gradcheck():
    emb = rand(2, 4, 3, grad=True)
    assert torch.autograd.gradcheck(lambda e: intra_class_kl_loss(e, k=2, max_kl=50.0), (emb,))


def test_icd_skipped_for_single_sample():
    emb = rand(2, 1, 4, grad=True)
    loss = intra_class_kl_loss(emb)
    assert loss.dim() == 0 and loss.item() == 0.0
    (loss + mean_feature_loss(rand(2, 3, 4, seed=1), emb)).backward()
    assert torch.isfinite(emb.grad).all()


def test_icd_guard_caps_at_max_kl():
    emb = (100 * torch.eye(3, dtype=D64)).unsqueeze(0).repeat(2, 1, 1).requires_grad_(True)
    loss = intra_class_kl_loss(emb, max_kl=5.0)
    assert loss.item() == -10.0  # two classes at the cap, summed
    loss.backward()
    assert emb.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_icd_no_nan_for_large_inputs(dtype):
    emb = (rand(2, 6, 8) * 1e4).to(dtype).requires_grad_(True)
    loss = intra_class_kl_loss(emb)
    loss.backward()
    assert torch.isfinite(loss) and -10.0 <= loss.item() <= 0.0
    assert torch.isfinite(emb.grad).all()


# --------------------------------------------------------------------------------------------------
# validation and registry
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda: mean_feature_loss(rand(2, 3, 4), rand(3, 3, 4)),  # class counts differ
        lambda: mean_feature_loss(rand(2, 3, 4), rand(2, 3, 5)),  # trailing dims differ
        lambda: mean_feature_loss(rand(2, 4), rand(2, 4)),  # no class grouping
        lambda: mean_feature_loss(rand(2, 3, 4).tolist(), rand(2, 3, 4)),  # not a tensor
        lambda: moment_loss([rand(2, 3, 2, 2, 2)], [rand(2, 3, 3, 2, 2)]),  # channels differ
        lambda: moment_loss([rand(2, 3, 2, 2, 2)], []),  # layer counts differ
        lambda: gram_loss([rand(2, 3, 4)], [rand(2, 3, 4)]),  # not a feature map
        lambda: local_covariance_loss(rand(2, 3, 2, 4), rand(1, 3, 2, 4)),
        lambda: class_centralization_loss(rand(2, 3, 4), form="cube"),
        lambda: class_centralization_loss(rand(4, 3)),
        lambda: intra_class_kl_loss(rand(2, 3, 4), k=3),  # k > Ns - 1
        lambda: intra_class_kl_loss(rand(2, 3, 4), max_kl=float("inf")),
        lambda: check_grouped(rand(2, 0, 4), rand(2, 3, 4)),  # empty batch
    ],
)
def test_bad_inputs_raise_ddkit_error(call):
    with pytest.raises(DDKitError):
        call()


def test_check_grouped_message_names_the_problem():
    with pytest.raises(DDKitError, match="class counts differ"):
        check_grouped(rand(2, 3, 4), rand(3, 3, 4))
    with pytest.raises(DDKitError, match="feature shapes differ"):
        check_grouped(rand(2, 3, 4), rand(2, 3, 5))
    check_grouped(rand(2, 3, 4), rand(2, 7, 4))  # different N is fine
