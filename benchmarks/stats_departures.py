"""Measure ddkit's named options of the statistics family against the published forms, small.

Usage: OMP_NUM_THREADS=1 python benchmarks/stats_departures.py [DATASET] [VARIANT ...]   (default: digits, all)

G-VBSM at IPC 10 with the smoke teacher pool (trained once and cached) and a smoke-sized recipe
made a little longer (recover 200 iterations, conv targets over 500 images, 50 record epochs);
each variant recovers one set (seed 0) and trains 3 soft-label students (seeds 0-2, smoke tier
of the evaluation recipe, 300 epochs). Prints one line per variant: the mean and population std of
the final test accuracy, and the seconds it took. Recover variants change one recover option;
evaluation variants evaluate the default set another way (with the same ResNet-18 student).
"""

import sys
import time

import numpy as np
import torch

import ddkit

BASE = ["iterations=200", "conv_target_images=500", "relabel.epochs=50", "log_every=1000"]
RECOVER_VARIANTS = {
    "published": [],
    "patch_form=cells": ["patch_form=cells"],
    "densify_form=unit": ["densify_form=unit"],
    "legacy_ema_zero_start": ["legacy_ema_zero_start=true"],
    # at IPC 10 of 10 classes one batch holds every image: batches of 20 let the EMA cross batches
    "batch_size=20": ["batch_size=20"],
    "batch_size=20,ema_scope=batch": ["batch_size=20", "ema_scope=batch"],
}
EVAL_VARIANTS = {
    "recipe=ddkit": {"recipe": "ddkit", "archs": ["resnet18"]},  # the published recipe's student
    "ce_label=mixed": {"overrides": ["ce_label=mixed"]},
}


def score(distilled, **options) -> str:
    overrides = ["epochs=300", *options.pop("overrides", [])]
    results = ddkit.evaluate(distilled, protocol="soft", preset="smoke", runs=3, overrides=overrides,
                             show_progress=False, record=False, **options)
    (result,) = results.values()
    accuracies = np.array(result.accuracies)
    return f"{accuracies.mean():.2f} +- {accuracies.std():.2f} ({result.config['recipe']}, {result.arch})"


def main(dataset: str, names: list[str]) -> None:
    default = None
    for name in names or [*RECOVER_VARIANTS, *EVAL_VARIANTS]:
        started = time.perf_counter()
        if name in RECOVER_VARIANTS:
            distilled = ddkit.distill("gvbsm", dataset=dataset, ipc=10, preset="smoke", seed=0,
                                      overrides=BASE + RECOVER_VARIANTS[name], show_progress=False)
            default = distilled if name == "published" else default
            text = score(distilled)
        else:
            if default is None:
                default = ddkit.distill("gvbsm", dataset=dataset, ipc=10, preset="smoke", seed=0, overrides=BASE,
                                        show_progress=False)
            text = score(default, **dict(EVAL_VARIANTS[name]))
        print(f"{dataset} gvbsm ipc 10 {name}: {text}, {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = sys.argv[1:]
    dataset = args.pop(0) if args and args[0] not in RECOVER_VARIANTS and args[0] not in EVAL_VARIANTS else "digits"
    main(dataset, args)
