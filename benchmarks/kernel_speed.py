"""Four ConvNet kernels, each against the one it replaced, and whole steps with all four on and off.

Usage:
    python benchmarks/kernel_speed.py [--iterations 7] [--quick]

The kernels (``ddkit.models.base``, ``ddkit.models.fused``):

- ``instance norm``: an instance norm of channels-last maps without gradients (DM's real side),
  per image as ``F.batch_norm`` over the image's pixels on maps of 16 x 16 pixels or more, against
  the earlier vectorised two-pass form over all images at once;
- ``pool backward``: the 2x2 average pool's backward as two plain copies (each value twice along a
  row, then each row twice), against one copy of the broadcast 2x2 window;
- ``one-pass block, bf16``: under bf16 autocast the one-pass first block rounds its output to bf16
  sub-batch by sub-batch, against a float32 output that the next convolution rounds (same values);
- ``first conv, bf16 training``: a trained one-channel first convolution under bf16 autocast in
  float32 with its output rounded, against autocast's bf16 convolution.

Then whole steps (DM's at the quick batch, fp32 and bf16; a ConvNet training step on 256 images,
fp32 and bf16) with all four as they are now (``after``) and all four as before (``before``).
Everything alternates in this process, timed in process CPU seconds on one thread; prints medians
and ratios. ``--quick``: tiny sizes on digits, a check that it runs.
``--threads N`` (N > 1): N torch threads, timed by the wall clock (on an otherwise idle machine).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ddkit.data import load_dataset
from ddkit.methods.sources import channels_last_twin
from ddkit.models import base, create, fused

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_of_light  # noqa: E402  (benchmarks/ is not a package)
from bn_statistics_speed import benchmark_arguments, compare_paths  # noqa: E402

CL = torch.channels_last


def previous_instance_norm(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The earlier channels-last instance norm: two passes over all images' rows at once."""
    n, c, height, width = h.shape
    rows = h.permute(0, 2, 3, 1).reshape(n, height * width, c)
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()
    centred = rows - rows.mean(1, keepdim=True)
    variance = (centred * centred).mean(1, keepdim=True)
    out = centred.mul_(weight.float() * torch.rsqrt(variance + eps)).add_(bias.float())
    return out.to(h.dtype).view(n, height, width, c).permute(0, 3, 1, 2)


def previous_pool_backward(ctx, grad: torch.Tensor) -> torch.Tensor:
    """The earlier 2x2 pool backward: one copy of the broadcast window."""
    n, c, h, w = grad.shape
    return (grad * 0.25)[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


@contextlib.contextmanager
def previous_kernels():
    """Within it the four kernels are the earlier ones."""
    kept = (base.channels_last_instance_norm, base._HalvingAverage.backward, fused.conv_instance_norm_relu_pool,
            base.run_layer)
    one_pass = fused.conv_instance_norm_relu_pool
    base.channels_last_instance_norm = previous_instance_norm
    base._HalvingAverage.backward = staticmethod(previous_pool_backward)
    fused.conv_instance_norm_relu_pool = lambda *args, out_dtype=None, **kwargs: one_pass(*args, **kwargs)
    base.run_layer = base.run_norm
    try:
        yield
    finally:
        (base.channels_last_instance_norm, base._HalvingAverage.backward, fused.conv_instance_norm_relu_pool,
         base.run_layer) = kept[0], staticmethod(kept[1]), kept[2], kept[3]


def both(fn) -> dict:
    """``fn`` as a ``before`` / ``after`` pair of functions."""
    def before():
        with previous_kernels():
            fn()
    return {"before": before, "after": fn}


def kernel_cases(sizes: dict, quick: bool) -> dict[str, dict]:
    """name -> {"before": fn, "after": fn} for each kernel alone."""
    generator = torch.Generator().manual_seed(0)
    channels, maps = sizes["conv_channels"], (32 if quick else 640)
    norm = torch.nn.GroupNorm(channels, channels)
    cases = {}
    for size in (16, 8):
        for dtype in (torch.float32, torch.bfloat16):
            chunks = [(torch.randn(128 if not quick else 8, channels, size, size, generator=generator) * 2 + 1)
                      .to(dtype).contiguous(memory_format=CL) for _ in range(maps // (128 if not quick else 8))]

            def run(chunks=chunks):
                with torch.no_grad():
                    for chunk in chunks:
                        base.run_norm(norm, chunk)
            cases[f"instance norm, {maps} maps {size}x{size}, {str(dtype)[6:]}"] = both(run)
    for dtype in (torch.float32, torch.bfloat16):
        grad = torch.randn(100, channels, 16, 16, generator=generator).to(dtype)
        cases[f"pool backward, 100 maps 16x16 -> 32x32, {str(dtype)[6:]}"] = both(
            lambda grad=grad: base._HalvingAverage.backward(None, grad))
    real = load_dataset(sizes["dataset"])
    in_channels, height, width = real.image_shape
    net = create("convnet", in_channels, real.num_classes, height, width=sizes["width"], depth=3)
    twin = channels_last_twin(net)
    images = torch.randn(maps, in_channels, height, width, generator=generator)

    def real_side():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for start in range(0, maps, 128):
                twin.forward_taps(images[start:start + 128], ("embedding",))
    cases[f"real side, {maps} images, bf16"] = both(real_side)
    batch = 256 if not quick else 16
    x = torch.randn(batch, in_channels, height, width, generator=generator)
    first = net.features[0]
    with torch.no_grad():
        out_shape = first(x[:1]).shape
    gradient = torch.randn(batch, *out_shape[1:], generator=generator).to(torch.bfloat16)

    def first_conv():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = base.run_layer(first, x)
        out.backward(gradient.to(out.dtype))
    cases[f"first conv, {batch} images, forward and backward, bf16"] = both(first_conv)
    return cases


def step_cases(sizes: dict, quick: bool) -> dict[str, dict]:
    """name -> {"before": fn, "after": fn} for whole steps."""
    real = load_dataset(sizes["dataset"])
    device = torch.device("cpu")
    cases = {}
    for precision in ("fp32", "bf16"):
        step = speed_of_light.matching_step(real, "dm", sizes, device, precision, sizes["batches"][0])
        cases[f"DM step, {sizes['batches'][0]} real images per class, {precision}"] = both(step)
    in_channels, height, width = real.image_shape
    net = create("convnet", in_channels, real.num_classes, height, width=sizes["width"], depth=3)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    batch = 256 if not quick else 16
    x = torch.randn(batch, in_channels, height, width, generator=generator)
    labels = torch.randint(0, real.num_classes, (batch,), generator=generator)
    for precision in ("fp32", "bf16"):
        def train_step(precision=precision):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        cases[f"ConvNet training step, {batch} images, {precision}"] = both(train_step)
    return cases


def main(argv=None) -> dict:
    args, sizes = benchmark_arguments(__doc__, 7, argv)
    return compare_paths({**kernel_cases(sizes, args.quick), **step_cases(sizes, args.quick)}, args.iterations)


if __name__ == "__main__":
    main()
