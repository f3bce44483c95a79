"""Eager against torch.compile for the matching family's distillation iterations (``distill --compile``).

Usage:
    OMP_NUM_THREADS=T python benchmarks/distill_compile_speed.py [--method dm] [--dataset fashion-mnist]
        [--ipc 50] [--iterations 10] [--threads T]

Builds the quick preset's matching engine for ``--method`` twice from the same seed, eagerly and
with ``compiled=True``, and times ``--iterations`` iterations of each. The compiled engine's first
two iterations compile (the real side without gradient, the synthetic side with it), so both
engines' steady time is the mean over the iterations after the first two. Prints seconds per
iteration, the compile's cost (the compiled run's first two iterations minus two steady ones), the
speed-up, and the largest relative difference between the two runs' logged losses (the same draws,
so only float rounding differs). A quick run is 200 iterations (150 for IDM and IDM+IID).
"""

from __future__ import annotations

import argparse
import time

import torch

from ddkit.data import load_dataset
from ddkit.methods.dm_family import resolve_preset
from ddkit.methods.matching import MatchingEngine

WARM_UP = 2


def timed_run(real, method: str, ipc: int, iterations: int, compiled: bool) -> tuple[list[float], list[float]]:
    """(seconds of each iteration, total loss of each iteration) of one engine."""
    engine = MatchingEngine(real, ipc, resolve_preset(method, real.name, ipc, "quick"), seed=0, device="cpu",
                            show_progress=False, compiled=compiled)
    seconds, losses = [], []
    for iteration in range(iterations):
        started = time.perf_counter()
        losses.append(engine.step(iteration)["total"])
        seconds.append(time.perf_counter() - started)
    return seconds, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="dm", help="dm | idm | iid | idm-iid | ddm (default dm)")
    parser.add_argument("--dataset", default="fashion-mnist", help="a fetched dataset (default fashion-mnist)")
    parser.add_argument("--ipc", type=int, default=50, help="images per class (default 50)")
    parser.add_argument("--iterations", type=int, default=10, help=f"iterations per engine, more than {WARM_UP}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    if args.iterations <= WARM_UP:
        parser.error(f"--iterations must be more than {WARM_UP}")
    torch.set_num_threads(args.threads)
    real = load_dataset(args.dataset)
    eager, eager_losses = timed_run(real, args.method, args.ipc, args.iterations, compiled=False)
    compiled, compiled_losses = timed_run(real, args.method, args.ipc, args.iterations, compiled=True)
    steady_eager = sum(eager[WARM_UP:]) / len(eager[WARM_UP:])
    steady_compiled = sum(compiled[WARM_UP:]) / len(compiled[WARM_UP:])
    drift = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager_losses, compiled_losses))
    print(f"eager    {steady_eager:6.2f} s/iteration")
    print(f"compiled {steady_compiled:6.2f} s/iteration (warm)")
    print(f"compile: {sum(compiled[:WARM_UP]) - WARM_UP * steady_compiled:.1f} s; speed-up "
          f"{steady_eager / steady_compiled:.2f}x; largest relative loss difference {drift:.1e} "
          f"({args.method}, {args.dataset} IPC {args.ipc}, {args.iterations} iterations, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
