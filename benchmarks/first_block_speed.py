"""A ConvNet's first block: layer by layer (convolution, instance norm, ReLU, 2x2 average pool)
against ddkit's one pass (``ddkit.models.fused``), alone, over DM's real side and inside whole DM
steps; with ``--gradients``, where gradients are recorded (``FirstBlockWithGradients``): the block's
forward and backward for DM's synthetic images and for training, whole DM and IDM steps and a
ConvNet training step, the forwards without gradients in one pass on both paths.

Usage:
    python benchmarks/first_block_speed.py [--iterations 9] [--precision fp32|bf16] [--quick]
    python benchmarks/first_block_speed.py --layers     # each stage of the real side's forward, one chunk
    python benchmarks/first_block_speed.py --gradients [--precision fp32|bf16]
    python benchmarks/first_block_speed.py --sizes      # the block by size, with and without gradients, one pass forced

Both paths run in this process, alternating, timed in process CPU seconds on one thread (fair on a
machine shared with other work); prints the median of each and the speed-up. ``--quick``: tiny
sizes on digits, a check that it runs.
``--threads N`` (N > 1): N torch threads, timed by the wall clock (on an otherwise idle machine).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
from pathlib import Path

import torch

from ddkit import precision as ddkit_precision
from ddkit.data import load_dataset
from ddkit.methods.sources import channels_last_twin
from ddkit.models import create, fused
from ddkit.models.base import run_layer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_of_light  # noqa: E402  (benchmarks/ is not a package)
from bn_statistics_speed import CLOCK, benchmark_arguments, compare_paths  # noqa: E402

PATHS = ("layer by layer", "one pass")


def with_path(path: str, fn, gradients_only: bool = False):
    """``fn`` run with the first block fused (``one pass``) or not (``layer by layer``; with
    ``gradients_only`` only where gradients are recorded)."""
    def run():
        with (speed_of_light.layer_by_layer(gradients_only) if path == "layer by layer"
              else contextlib.nullcontext()):
            fn()
    return run


def real_side(net, images: torch.Tensor, chunk: int, precision: str):
    """DM's real side: the embeddings of ``images`` through ``net``'s channels-last twin, without
    gradients, ``chunk`` images at a time (as ``MatchingEngine`` runs it)."""
    twin = channels_last_twin(net)
    amp = ddkit_precision.Amp(precision, images.device)

    def run():
        with torch.no_grad(), amp.autocast():
            for start in range(0, images.shape[0], chunk):
                twin.forward_taps(images[start:start + chunk], ("embedding",))
    return run


def layer_by_layer_block(net, h: torch.Tensor) -> torch.Tensor:
    """``net.features[:4]`` on ``h``, one layer after another (as ``SequentialTapModel`` runs them)."""
    for layer in list(net.features)[:4]:
        h = run_layer(layer, h)
    return h


def model_block(net, x: torch.Tensor) -> tuple[torch.Tensor, str]:
    """``net``'s first block on ``x`` the way the model runs it, and which way that was: in one
    pass where it applies, else layer by layer."""
    out = net.one_pass_first_block(x)
    return (out, "one pass") if out is not None else (layer_by_layer_block(net, x), "layer by layer")


def first_block(net, images: torch.Tensor):
    """The first block alone on ``images``, through the channels-last twin: the path the model
    would take (one pass unless turned off), timed without the rest of the network."""
    twin = channels_last_twin(net)

    def run():
        with torch.no_grad():
            model_block(twin, images)
    return run


def block_upstream(net, images: torch.Tensor, train: bool) -> torch.Tensor:
    """Set the first block's convolution and norm to train (``train``) or to stay frozen, and
    return the gradient to send back through the block: its own output on ``images``."""
    for parameter in (*net.features[0].parameters(), *net.features[1].parameters()):
        parameter.requires_grad_(train)
    with torch.no_grad():
        return net.features[:4](images)


def block_with_gradients(net, images: torch.Tensor, precision: str, train: bool):
    """The first block's forward and backward on ``images``: of the images through frozen layers
    (DM's synthetic side), or of the weights (``train``); ``net``'s other layers are not run."""
    upstream = block_upstream(net, images, train)
    amp = ddkit_precision.Amp(precision, images.device)

    def run():
        x = images.clone().requires_grad_(not train)
        with amp.autocast():
            out, _ = model_block(net, x)
        out.backward(upstream.to(out.dtype))
    return run


#: what ``--sizes`` times: a forward without gradients (through the channels-last twin, as DM's
#: real side), a forward and backward for the images' gradient, or for the weights'
SIZE_MODES = ("no gradients", "images' gradient", "weights' gradients")


def forced_block_paths(in_channels: int, size: int, width: int, count: int, mode: str,
                       generator: torch.Generator) -> dict:
    """The first block on ``count`` random ``size`` x ``size`` images of a width-``width``
    ConvNet, layer by layer and in one pass whatever ``ddkit.models.fused.one_pass_pays`` says
    (to find where it pays), in one of :data:`SIZE_MODES`."""
    net = create("convnet", in_channels, 10, size, width=width, depth=3)
    if mode == "no gradients":
        net = channels_last_twin(net)
    conv, norm = net.features[0], net.features[1]
    train = mode == "weights' gradients"
    images = torch.randn(count, in_channels, size, size, generator=generator)
    upstream = block_upstream(net, images, train)

    def layers():
        with torch.set_grad_enabled(mode != "no gradients"):
            out = layer_by_layer_block(net, images.clone().requires_grad_(mode == "images' gradient"))
        if mode != "no gradients":
            out.backward(upstream)

    def one_pass():
        if mode == "no gradients":
            with torch.no_grad():
                fused.conv_instance_norm_relu_pool(images, conv, norm, channels_last=True)
            return
        out = fused.first_block_with_gradients(images.clone().requires_grad_(not train), conv, norm)
        out.backward(upstream)
    return {"layer by layer": layers, "one pass": one_pass}


def forced_real_side(in_channels: int, size: int, width: int, count: int, generator: torch.Generator) -> dict:
    """DM's real side (:func:`real_side`) on ``count`` random ``size`` x ``size`` images, with the
    first block layer by layer and in one pass whatever ``ddkit.models.fused.one_pass_pays`` says."""
    net = create("convnet", in_channels, 10, size, width=width, depth=3)
    run = real_side(net, torch.randn(count, in_channels, size, size, generator=generator), min(count, 128), "fp32")

    def one_pass():
        kept = fused.one_pass_pays
        fused.one_pass_pays = lambda conv, x: True
        try:
            run()
        finally:
            fused.one_pass_pays = kept
    return {"layer by layer": with_path("layer by layer", run), "one pass": one_pass}


def training_step(net, images: torch.Tensor, labels: torch.Tensor, precision: str):
    """One SGD step of ``net`` on ``images`` (cross-entropy, autocast in ``precision``)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    amp = ddkit_precision.Amp(precision, images.device)

    def run():
        with amp.autocast():
            logits = net(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return run


def gradient_cases(real, sizes: dict, generator: torch.Generator, precision: str, quick: bool) -> dict:
    """name -> fn for the ``--gradients`` comparison."""
    channels, height, width = real.image_shape
    synthetic, batch = (100, 256) if not quick else (10, 16)
    cases = {}
    for train, count in ((False, synthetic), (True, batch)):
        net = create("convnet", channels, real.num_classes, height, width=sizes["width"], depth=3)
        images = torch.randn(count, channels, height, width, generator=generator)
        what = "weights' gradients" if train else "images' gradient"
        cases[f"first block, {count} images, forward and backward, {what} ({precision})"] = block_with_gradients(
            net, images, precision, train)
    device = torch.device("cpu")
    for method in ("dm", "idm"):
        cases[f"{method.upper()} step, {sizes['batches'][0]} real images per class ({precision})"] = (
            speed_of_light.matching_step(real, method, sizes, device, precision, sizes["batches"][0]))
    net = create("convnet", channels, real.num_classes, height, width=sizes["width"], depth=3)
    images = torch.randn(batch, channels, height, width, generator=generator)
    labels = torch.randint(0, real.num_classes, (batch,), generator=generator)
    cases[f"ConvNet training step, {batch} images ({precision})"] = training_step(net, images, labels, precision)
    return cases


def per_layer_seconds(net, images: torch.Tensor, iterations: int, precision: str) -> dict[str, float]:
    """Median process CPU seconds of each stage of the channels-last twin's forward on ``images``
    without gradients, in ``precision``: the first block (in one pass where it pays, else its four
    layers), then layer by layer."""
    twin = channels_last_twin(net)
    seconds: dict[str, list[float]] = {}
    with torch.no_grad(), ddkit_precision.Amp(precision, images.device).autocast():
        for _ in range(iterations + 1):  # the first round warms up
            start = CLOCK["clock"]()
            h, path = model_block(twin, images)
            seconds.setdefault(f"first block ({path})", []).append(CLOCK["clock"]() - start)
            for index in range(4, len(twin.features)):
                layer = twin.features[index]
                start = CLOCK["clock"]()
                h = run_layer(layer, h)
                seconds.setdefault(f"{index}: {type(layer).__name__}", []).append(CLOCK["clock"]() - start)
    return {name: statistics.median(values[1:]) for name, values in seconds.items()}


def main(argv=None) -> dict:
    def more(parser):
        parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                            help="the precision of the real side and of the DM steps (default fp32)")
        parser.add_argument("--layers", action="store_true",
                            help="instead, the seconds of each stage of the real side's forward on one chunk")
        parser.add_argument("--gradients", action="store_true",
                            help="instead, the paths where gradients are recorded (synthetic side, training)")
        parser.add_argument("--sizes", action="store_true",
                            help="instead, the first block at several image sizes and widths, with and without "
                                 "gradients, one pass forced (where it pays: ddkit.models.fused.one_pass_pays)")

    args, sizes = benchmark_arguments(__doc__, 9, argv, more)
    real = load_dataset(sizes["dataset"])
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    channels, height, width = real.image_shape
    net = create("convnet", channels, real.num_classes, height, width=sizes["width"], depth=3)
    chunk = 128 if not args.quick else 8
    per_class = sizes["batches"][-1]
    images = torch.randn(per_class * real.num_classes, channels, height, width, generator=generator)
    if args.layers:
        stages = per_layer_seconds(net, images[:chunk], args.iterations, args.precision)
        for name, value in stages.items():
            print(f"{name}: {value * 1e3:.2f} ms")
        print(f"total: {sum(stages.values()) * 1e3:.2f} ms per {chunk} images")
        return stages
    if args.sizes:
        grid = ((1, 8, 32), (1, 8, 128), (1, 16, 32), (1, 16, 128), (1, 28, 32), (1, 28, 64), (1, 28, 128),
                (1, 32, 128), (3, 32, 32), (3, 32, 128))
        count = 100 if not args.quick else 4
        cases = {f"{channels} x {size} x {size} images, width {width}, {mode}":
                 forced_block_paths(channels, size, width if not args.quick else 8, count, mode, generator)
                 for channels, size, width in (grid if not args.quick else grid[:1]) for mode in SIZE_MODES}
        for channels, size in ((1, 28), (3, 32)):  # Fashion-MNIST and CIFAR sizes
            cases[f"DM's real side, {count * 6 + 40} images of {channels} x {size} x {size}, width 128"] = (
                forced_real_side(channels, size, 128 if not args.quick else 8, count * 6 + 40, generator))
        return compare_paths(cases, args.iterations)
    if args.gradients:
        cases = gradient_cases(real, sizes, generator, args.precision, args.quick)
        return compare_paths({case: {path: with_path(path, fn, gradients_only=True) for path in PATHS}
                              for case, fn in cases.items()}, args.iterations)
    cases = {f"first block, {chunk} images": first_block(net, images[:chunk]),
             f"real side, {images.shape[0]} images in chunks of {chunk} ({args.precision})":
                 real_side(net, images, chunk, args.precision)}
    for batch in sizes["batches"]:
        cases[f"DM step, {batch} real images per class ({args.precision})"] = speed_of_light.matching_step(
            real, "dm", sizes, device, args.precision, batch)
    return compare_paths({case: {path: with_path(path, fn) for path in PATHS} for case, fn in cases.items()},
                         args.iterations)

if __name__ == "__main__":
    main()
