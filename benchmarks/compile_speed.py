"""Eager against torch.compile for one quick hard-label evaluation run (ConvNet, DSA, SGD).

Usage:
    OMP_NUM_THREADS=T python benchmarks/compile_speed.py [--dataset fashion-mnist] [--ipc 50] [--epochs 10]
        [--threads T] [--profile]
    OMP_NUM_THREADS=T python benchmarks/compile_speed.py --accuracy SET [--threads T]

Trains the quick preset's evaluation network on the random subset of ``--ipc`` images per class for
``--epochs`` epochs, three times from the same seed: eagerly, compiled (the first compiled run pays
for the compile), and compiled again in the same process (the compiled kernels are cached). Prints
seconds per epoch of each, the compile's cost (first compiled run minus the warm one) and the
speed-up of the warm compiled run. A quick run is 300 epochs, so its time is about 300 x s/epoch,
plus the compile once per process and batch shape. ``--profile`` instead prints where the time of
``--epochs`` eager epochs goes (torch.profiler, the operators with the most self time).

``--accuracy SET`` evaluates a saved set that holds a finished eager quick hard-label evaluation
(3 runs, seeds 0 to 2) again, compiled and unrecorded, and prints both: the same protocol and seeds,
so the two differ by float rounding only.
"""

from __future__ import annotations

import argparse
import time

import torch

from ddkit.augment import DSA, dsa_strategy_for
from ddkit.data import load_dataset
from ddkit.evaluate import build_model, random_subset, resolve_config
from ddkit.models.training import train_classifier
from ddkit.utils import make_generator, normalize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist", help="a fetched dataset (default fashion-mnist)")
    parser.add_argument("--ipc", type=int, default=50, help="images per class of the random subset (default 50)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per timed run (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--profile", action="store_true", help="profile the eager epochs instead of timing both")
    parser.add_argument("--accuracy", metavar="SET", help="compare a set's stored eager evaluation with a compiled one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.accuracy:
        compare_accuracy(args.accuracy)
        return
    real = load_dataset(args.dataset)
    subset = random_subset(real, args.ipc, seed=0)
    decoded, labels = subset.decoded()  # float pixel space [0, 1], as the evaluator trains on it
    images = normalize(decoded, subset.mean, subset.std)
    config = dict(resolve_config("hard", "quick"), epochs=args.epochs)
    channels, size = subset.image_shape[0], subset.image_shape[1]
    dsa = DSA(dsa_strategy_for(real.name))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        model = build_model("convnet", channels, real.num_classes, size, dict(config["model"]), 0, "cpu")
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            train_classifier(model, images, labels, config, make_generator(0), dsa=dsa)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        return
    seconds = {}
    for label, compiled in (("eager", False), ("compiled, first", True), ("compiled, warm", True)):
        model = build_model("convnet", channels, real.num_classes, size, dict(config["model"]), 0, "cpu")
        started = time.perf_counter()
        train_classifier(model, images, labels, config, make_generator(0), dsa=dsa, compiled=compiled)
        seconds[label] = time.perf_counter() - started
        print(f"{label:16s} {seconds[label] / args.epochs:6.2f} s/epoch ({seconds[label]:.1f} s for {args.epochs})",
              flush=True)
    print(f"compile: {seconds['compiled, first'] - seconds['compiled, warm']:.1f} s; warm speed-up "
          f"{seconds['eager'] / seconds['compiled, warm']:.2f}x ({args.dataset} IPC {args.ipc}: "
          f"{len(labels)} images, batch {config['batch_size']}, {args.threads} thread(s))")


def compare_accuracy(path: str) -> None:
    import ddkit

    distilled = ddkit.load(path)
    eager = [rec for rec in distilled.meta.get("evaluations", []) if not rec.get("partial") and not rec.get("compiled")
             and (rec["protocol"], rec["preset"], rec["seeds"]) == ("hard", "quick", [0, 1, 2])]
    if not eager:
        raise SystemExit(f"{path} holds no finished eager quick hard-label evaluation of seeds 0-2")
    started = time.perf_counter()
    result = ddkit.evaluate(distilled, protocol="hard", preset="quick", runs=3, record=False, show_progress=False,
                            compiled=True)["convnet"]
    print(f"eager    {eager[-1]['accuracies']} mean {eager[-1]['mean']:.2f} +- {eager[-1]['std']:.2f} "
          f"({eager[-1]['date']})")
    print(f"compiled {[round(a, 2) for a in result.accuracies]} mean {result.mean:.2f} +- {result.std:.2f} "
          f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
