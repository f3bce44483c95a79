"""Batched crops, flips, jitter, padded crops and the CDA schedule of the statistics family. Tiny tensors only."""

import math

import pytest
import torch
import torch.nn.functional as F

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
