"""Where a matching step's time goes: the parts of ``MatchingEngine.step`` timed one by one.

Usage:
    python benchmarks/step_breakdown.py [--methods dm,idm,iid,ddm] [--precision fp32|bf16]
        [--batch-real 64] [--iterations 5] [--quick]

Each method's quick preset (Fashion-MNIST IPC 10, ConvNet-3 width 128, as in
``speed_of_light.py``) runs ``--iterations`` steps after one warm-up; the process CPU seconds of
each part are averaged over the steps and printed beside the median step:

- ``network``: drawing the step's network (DM's random one, IDM's queued one);
- ``real images``: sampling the real batch; ``augmentation``: DSA of the real and synthetic images;
- ``real side``: the real images' features without gradients (``_real_taps``);
- ``synthetic side and terms``: the synthetic forward and the loss terms;
- ``backward``: backpropagation to the synthetic images; ``image step``: the optimiser's step;
- ``queue training``: IDM's training of queued networks on real batches; ``extractor``: IID's
  pretrained extractor drawn for the step;
- ``rest``: everything else (the augmentation's parameters, gradients zeroed, ...).

One thread, process CPU time (fair on a shared machine). ``--quick``: digits and a tiny network.
``--threads N`` (N > 1): N torch threads, timed by the wall clock (on an otherwise idle machine).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

import ddkit.methods.matching as matching
from ddkit.data import load_dataset
from ddkit.methods.matching import MatchingEngine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_of_light  # noqa: E402  (benchmarks/ is not a package)
from bn_statistics_speed import CLOCK, benchmark_arguments  # noqa: E402


#: the parts in the order a step runs them
PARTS = ("network", "extractor", "real images", "augmentation", "real side", "synthetic side and terms", "backward",
         "image step", "queue training")


def timed_parts(engine: MatchingEngine, seconds: dict[str, float]):
    """Wrap the parts of ``engine``'s step so that each adds its process CPU seconds to
    ``seconds``; returns a function that undoes the wrapping."""
    undo = []

    def wrap(owner, attribute: str, part: str) -> None:
        original = getattr(owner, attribute)

        def run(*args, **kwargs):
            start = CLOCK["clock"]()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[part] = seconds.get(part, 0.0) + CLOCK["clock"]() - start
        setattr(owner, attribute, run)
        undo.append(lambda: setattr(owner, attribute, original))

    wrap(engine.source, "next", "network")
    wrap(engine.sampler, "per_class", "real images")
    wrap(matching, "siamese_per_class", "augmentation")
    wrap(engine, "_real_taps", "real side")
    wrap(engine, "_class_losses", "real side, synthetic side and terms")
    wrap(engine, "_backward", "backward")
    wrap(engine.optimizer, "step", "image step")
    wrap(engine.source, "after_step", "queue training")
    if engine.pool is not None:
        wrap(engine.pool, "next", "extractor")

    def restore():
        for step in reversed(undo):
            step()
    return restore


def breakdown(real, method: str, sizes: dict, precision: str, batch_real: int | None, iterations: int) -> dict:
    """The median step and the mean seconds of each part over ``iterations`` steps of ``method``."""
    step = speed_of_light.matching_step(real, method, sizes, torch.device("cpu"), precision, batch_real)
    engine = next(cell.cell_contents for cell in step.__closure__ if isinstance(cell.cell_contents, MatchingEngine))
    step()  # warm-up
    seconds: dict[str, float] = {}
    restore = timed_parts(engine, seconds)
    steps = []
    try:
        for _ in range(iterations):
            start = CLOCK["clock"]()
            step()
            steps.append(CLOCK["clock"]() - start)
    finally:
        restore()
    means = {name: value / iterations for name, value in seconds.items()}
    means["synthetic side and terms"] = (means.pop("real side, synthetic side and terms", 0.0)
                                         - means.get("real side", 0.0))
    parts = {name: means[name] for name in PARTS if name in means}
    parts["rest"] = statistics.mean(steps) - sum(parts.values())
    return {"step": statistics.median(steps), "parts": parts}


def main(argv=None) -> dict:
    def more(parser):
        parser.add_argument("--methods", default="dm,idm,iid,ddm", help="comma-separated (default dm,idm,iid,ddm)")
        parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="default fp32")
        parser.add_argument("--batch-real", type=int, default=None,
                            help="real images per class (default: the quick preset's)")

    args, sizes = benchmark_arguments(__doc__, 5, argv, more)
    real = load_dataset(sizes["dataset"])
    result = {}
    for method in args.methods.split(","):
        result[method] = breakdown(real, method, sizes, args.precision, args.batch_real, args.iterations)
        parts = ", ".join(f"{name} {value * 1e3:.1f}" for name, value in result[method]["parts"].items())
        print(f"{method} ({args.precision}): step {result[method]['step'] * 1e3:.1f} ms = {parts} ms", flush=True)
    return result


if __name__ == "__main__":
    main()
