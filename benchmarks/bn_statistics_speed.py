"""The statistics of the recover hooks: torch.var_mean against ddkit's row reductions, for the
per-channel BatchNorm statistics (``ddkit.losses.statistics.bn_statistics``) and G-VBSM's patch
statistics (``patch_statistics``), alone and inside one SRe2L and one G-VBSM recover iteration.

Usage:
    python benchmarks/bn_statistics_speed.py [--iterations 15] [--quick]

Both paths run in this process, alternating, timed in process CPU seconds on one thread (fair on a
machine shared with other work); prints the median of each and the speed-up. ``--quick``: tiny
sizes on digits, a check that it runs.
``--threads N`` (N > 1): N torch threads, timed by the wall clock (on an otherwise idle machine).
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


#: the clock of :func:`median_cpu_seconds`: this process's CPU time on one thread (fair on a shared
#: machine), the wall clock with more threads (``--threads``; CPU time would add the threads' times)
CLOCK = {"clock": time.process_time}


def median_cpu_seconds(functions: dict, iterations: int) -> dict[str, float]:
    """Median seconds (:data:`CLOCK`) of each ``name -> function`` (no arguments), alternating between them."""
    clock = CLOCK["clock"]
    seconds = {name: [] for name in functions}
    for _ in range(iterations):
        for name, run in functions.items():
            start = clock()
            run()
            seconds[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def benchmark_arguments(doc: str, iterations: int, argv=None, more=None) -> tuple[argparse.Namespace, dict]:
    """The options every before/after benchmark here takes (``--iterations``, ``--quick``,
    ``--threads``, and any that ``more(parser)`` adds), parsed from ``argv``, with torch set to
    that many threads (default one) and :data:`CLOCK` to process CPU time on one thread, else to
    the wall clock.

    Returns:
        The parsed options and the sizes of the run (``speed_of_light.SIZES``: full or quick).
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=iterations,
                        help=f"timed calls per path (default {iterations})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on digits: a check that it runs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: process CPU seconds, fair on a shared machine; "
                             "more: wall-clock seconds, on an otherwise idle machine)")
    if more is not None:
        more(parser)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be 1 or more, got {args.threads}")
    torch.set_num_threads(args.threads)
    CLOCK["clock"] = time.process_time if args.threads == 1 else time.perf_counter
    return args, speed_of_light.SIZES["quick" if args.quick else "full"]


def compare_paths(cases: dict[str, dict], iterations: int) -> dict[str, dict[str, float]]:
    """Time each case's two paths against each other and print the result.

    Args:
        cases: case name -> ``{path name: function}`` with two paths, the reference first.
        iterations: timed calls of each path (alternating, after one warm-up call each).

    Returns:
        case name -> the median process CPU seconds of each path and ``speed-up`` (the first
        path's seconds over the second's); each case is printed as one line.
    """
    result = {}
    for case, paths in cases.items():
        for fn in paths.values():
            fn()  # warm-up
        times = median_cpu_seconds(paths, iterations)
        (first, first_seconds), (second, second_seconds) = times.items()
        result[case] = {**times, "speed-up": first_seconds / second_seconds}
        print(f"{case}: {first} {first_seconds * 1e3:.1f} ms, {second} {second_seconds * 1e3:.1f} ms, "
              f"{first_seconds / second_seconds:.2f}x", flush=True)
    return result


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
    args, sizes = benchmark_arguments(__doc__, 15, argv)
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
    return compare_paths({case: {path: on_path(path, replaced, fn) for path in PATHS}
                          for case, (replaced, fn) in cases.items()}, args.iterations)

if __name__ == "__main__":
    main()
