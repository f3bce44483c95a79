"""Recover G-VBSM's quick preset with a few option changes and print where each run ends.

Usage: OMP_NUM_THREADS=1 python benchmarks/gvbsm_variants.py [VARIANT ...]   (default: all)

Fashion-MNIST, IPC 10, seed 0, the quick teacher pool (trained once and cached). For each
variant: the class spread of the recovered pixels (benchmarks/class_spread.py, pixel units here)
and the last loss-log entry. No evaluation: this is for finding out why recovery does not fit.
"""

import sys
import time

import torch

from ddkit.data import load_dataset
from ddkit.methods import stats_family
from ddkit.methods.recover import RecoverEngine

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from class_spread import spread  # noqa: E402

VARIANTS = {
    "gvbsm": [],
    "stats-x100": ["r_bn=1", "r_conv=1"],
    "stats-x100-jitter4": ["r_bn=1", "r_conv=1", "jitter=4"],
    "lr0.1": ["lr=0.1"],
    "no-densify": ["densify_weight=0"],
    "no-ema": ["ema_alpha=null"],
}


def main(names: list[str]) -> None:
    real = load_dataset("fashion-mnist")
    base = ["log_every=1000"]
    teachers = stats_family.method_teachers(real, stats_family.resolve_preset("gvbsm", real.name, None, "quick", base), 0,
                                            "cpu", False)
    for name in names or list(VARIANTS):
        config = stats_family.resolve_preset("gvbsm", real.name, None, "quick", base + VARIANTS[name])
        started = time.perf_counter()
        images, _, record = RecoverEngine(real, 10, config["recover"], teachers, 0, "cpu", False).run()
        within, between = spread(images, real.num_classes)
        print(f"{name}: within {within:.3f} between {between:.3f} ({time.perf_counter() - started:.0f} s) "
              f"last log {record['loss_log'][-1]}", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
