"""The statistics of the recover hooks: torch.var_mean against ddkit's row reductions, for the
per-channel BatchNorm statistics (``ddkit.losses.statistics.bn_statistics``) and G-VBSM's patch
statistics (``patch_statistics``), alone and inside one SRe2L and one G-VBSM recover iteration.

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


#: the row-reduction function of each statistic, and the torch.var_mean function that replaces it
#: on the ``torch.var_mean`` path
VAR_MEAN = {"_two_pass_channel_statistics": bn_stats._var_mean_channel_statistics,
            "_patch_rows_statistics": bn_stats._var_mean_patch_statistics}
PATHS = ("torch.var_mean", "row reduction")


def median_cpu_seconds(functions: dict, iterations: int) -> dict[str, float]:
    """Median process CPU seconds of each ``name -> function`` (no arguments), alternating between them."""
    seconds = {name: [] for name in functions}
    for _ in range(iterations):
        for name, run in functions.items():
            start = time.process_time()
            run()
            seconds[name].append(time.process_time() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def on_path(path: str, replaced: tuple[str, ...], fn):
    """``fn`` run with the row reductions named in ``replaced`` swapped for ``torch.var_mean`` on
    the ``torch.var_mean`` path, as they are on the other."""
    def run():
        kept = {name: getattr(bn_stats, name) for name in replaced}
        if path == "torch.var_mean":
            for name in replaced:
                setattr(bn_stats, name, VAR_MEAN[name])
        try:
            fn()
        finally:
            for name, function in kept.items():
                setattr(bn_stats, name, function)
    return run


def forward_backward(statistic, shape: tuple[int, ...]):
    """One forward and backward of ``statistic`` (a map -> (mean, var)) on a random map of ``shape``."""
    x = torch.randn(shape).requires_grad_()

    def run():
        mean, var = statistic(x)
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
    bn, patch = ("_two_pass_channel_statistics",), ("_patch_rows_statistics",)
    cases = {f"bn_statistics {'x'.join(map(str, shape))}": (bn, forward_backward(bn_stats.bn_statistics, shape))
             for shape in shapes}
    cases.update({f"patch_statistics {'x'.join(map(str, shape))}, 4-pixel patches":
                  (patch, forward_backward(lambda x: bn_stats.patch_statistics(x, 4), shape)) for shape in shapes})
    real = load_dataset(sizes["dataset"])
    cpu = torch.device("cpu")
    cases["SRe2L recover iteration (quick)"] = (bn, speed_of_light.recover_step(real, sizes, cpu, "fp32"))
    cases["G-VBSM recover iteration (quick), both statistics"] = (
        bn + patch, speed_of_light.recover_step(real, sizes, cpu, "fp32", method="gvbsm"))
    result = {}
    for case, (replaced, fn) in cases.items():
        fn()  # warm-up
        times = median_cpu_seconds({path: on_path(path, replaced, fn) for path in PATHS}, args.iterations)
        speedup = times["torch.var_mean"] / times["row reduction"]
        result[case] = {**times, "speed-up": speedup}
        print(f"{case}: torch.var_mean {times['torch.var_mean'] * 1e3:.1f} ms, "
              f"row reduction {times['row reduction'] * 1e3:.1f} ms, {speedup:.2f}x")
    return result


if __name__ == "__main__":
    main()
