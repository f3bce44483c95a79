"""The per-channel BatchNorm statistics of the recover hooks: torch.var_mean against ddkit's row
reduction (``ddkit.losses.statistics.bn_statistics``), alone and inside one SRe2L recover iteration.

Usage:
    python benchmarks/bn_statistics_speed.py [--iterations 15] [--quick]

Both paths run in this process, alternating, timed in process CPU seconds on one thread (fair on a
machine shared with other work); prints the median of each and the speed-up. ``--quick``: tiny
sizes on digits, a check that it runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import ddkit.losses.statistics as bn_stats
from ddkit.data import load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_of_light  # noqa: E402  (benchmarks/ is not a package)


PATHS = {"torch.var_mean": bn_stats._var_mean_channel_statistics,
         "row reduction": bn_stats._two_pass_channel_statistics}


def median_cpu_seconds(functions: dict, iterations: int) -> dict[str, float]:
    """Median process CPU seconds of each ``name -> function`` (no arguments), alternating between them."""
    seconds = {name: [] for name in functions}
    for _ in range(iterations):
        for name, run in functions.items():
            start = time.process_time()
            run()
            seconds[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def with_statistics(impl, fn):
    """``fn`` run with ``bn_statistics``'s CPU path replaced by ``impl``."""
    def run():
        kept = bn_stats._two_pass_channel_statistics
        bn_stats._two_pass_channel_statistics = impl
        try:
            fn()
        finally:
            bn_stats._two_pass_channel_statistics = kept
    return run


def forward_backward(shape: tuple[int, ...]):
    """One ``bn_statistics`` forward and backward on a random map of ``shape``."""
    x = torch.randn(shape).requires_grad_()

    def run():
        mean, var = bn_stats.bn_statistics(x)
        (mean.sum() + var.sum()).backward()
    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=15, help="timed calls per path (default 15)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on digits: a check that it runs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sizes = speed_of_light.SIZES["quick" if args.quick else "full"]
    shapes = [(4, 8, 8, 8)] if args.quick else [(100, 32, 32, 32), (100, 64, 16, 16), (100, 128, 32, 32)]
    cases = {f"bn_statistics {'x'.join(map(str, shape))}": forward_backward(shape) for shape in shapes}
    real = load_dataset(sizes["dataset"])
    cases["SRe2L recover iteration (quick)"] = speed_of_light.recover_step(real, sizes, torch.device("cpu"), "fp32")
    result = {}
    for case, fn in cases.items():
        fn()  # warm-up
        times = median_cpu_seconds({name: with_statistics(impl, fn) for name, impl in PATHS.items()}, args.iterations)
        speedup = times["torch.var_mean"] / times["row reduction"]
        result[case] = {**times, "speed-up": speedup}
        print(f"{case}: torch.var_mean {times['torch.var_mean'] * 1e3:.1f} ms, "
              f"row reduction {times['row reduction'] * 1e3:.1f} ms, {speedup:.2f}x")
    return result


if __name__ == "__main__":
    main()
