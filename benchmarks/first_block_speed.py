"""A ConvNet's first block without gradients: layer by layer (convolution, instance norm, ReLU, 2x2
average pool) against ddkit's one pass (``ddkit.models.fused``), alone, over DM's real side and
inside whole DM steps.

Usage:
    python benchmarks/first_block_speed.py [--iterations 9] [--precision fp32|bf16] [--quick]
    python benchmarks/first_block_speed.py --layers     # each stage of the real side's forward, one chunk

Both paths run in this process, alternating, timed in process CPU seconds on one thread (fair on a
machine shared with other work); prints the median of each and the speed-up. ``--quick``: tiny
sizes on digits, a check that it runs.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import sys
from pathlib import Path

import torch

from ddkit import precision as ddkit_precision
from ddkit.data import load_dataset
from ddkit.methods.sources import channels_last_twin
from ddkit.models import create
from ddkit.models.base import run_layer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_of_light  # noqa: E402  (benchmarks/ is not a package)
from bn_statistics_speed import benchmark_arguments, compare_paths  # noqa: E402

PATHS = ("layer by layer", "one pass")


def with_path(path: str, fn):
    """``fn`` run with the first block fused (``one pass``) or not (``layer by layer``)."""
    def run():
        with speed_of_light.layer_by_layer() if path == "layer by layer" else contextlib.nullcontext():
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


def first_block(net, images: torch.Tensor):
    """The first block alone on ``images``, through the channels-last twin: the path the model
    would take (one pass unless turned off), timed without the rest of the network."""
    twin = channels_last_twin(net)

    def run():
        with torch.no_grad():
            if twin.one_pass_first_block(images) is None:
                h = images
                for layer in list(twin.features)[:4]:
                    h = run_layer(layer, h)
    return run


def per_layer_seconds(net, images: torch.Tensor, iterations: int, precision: str) -> dict[str, float]:
    """Median process CPU seconds of each stage of the channels-last twin's forward on ``images``
    without gradients, in ``precision``: the first block (in one pass), then layer by layer."""
    twin = channels_last_twin(net)
    seconds: dict[str, list[float]] = {}
    with torch.no_grad(), ddkit_precision.Amp(precision, images.device).autocast():
        for _ in range(iterations + 1):  # the first round warms up
            start = time.process_time()
            h = twin.one_pass_first_block(images)
            seconds.setdefault("first block (one pass)", []).append(time.process_time() - start)
            for index in range(4, len(twin.features)):
                layer = twin.features[index]
                start = time.process_time()
                h = run_layer(layer, h)
                seconds.setdefault(f"{index}: {type(layer).__name__}", []).append(time.process_time() - start)
    return {name: statistics.median(values[1:]) for name, values in seconds.items()}


def main(argv=None) -> dict:
    def more(parser):
        parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                            help="the precision of the real side and of the DM steps (default fp32)")
        parser.add_argument("--layers", action="store_true",
                            help="instead, the seconds of each stage of the real side's forward on one chunk")

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
