"""The random real subset: the baseline every method is judged against, registered as the method
``random`` so that benchmarks treat it like any other."""

from __future__ import annotations

import time

from ddkit.data.sampling import sample_real_per_class
from ddkit.errors import DDKitError
from ddkit.methods.registry import register_method
from ddkit.store import DistilledSet
from ddkit.utils import make_generator


def random_subset(real, ipc: int, seed: int = 0):
    """The random-real-subset baseline: ``ipc`` random training images per class as a DistilledSet.

    Args:
        real: a :class:`ddkit.data.RealDataset`.
        ipc: images per class.
        seed: drives the choice.

    Returns:
        DistilledSet with method "random", images float32 [K*ipc, C, H, W] in [0, 1].
    """
    started = time.perf_counter()
    index = sample_real_per_class(real, ipc, make_generator(seed))
    return DistilledSet(
        images=real.train.images[index].float() / 255.0,
        labels=real.train.labels[index].clone(),
        class_names=list(real.class_names),
        dataset=real.name,
        mean=real.mean,
        std=real.std,
        method="random",
        meta={
            "config": {"ipc": ipc, "selection": "uniform without replacement per class"},
            "seeds": {"selection": seed},
            "timings": {"distill_seconds": round(time.perf_counter() - started, 3)},
            "source_indices": index.tolist(),
        },
    )


@register_method("random", family="baseline")
def distill_random(real, ipc, preset="quick", overrides=None, seed=0, device="cpu", show_progress=True):
    """The random real subset as a 'method', so benchmarks treat the baseline like any other."""
    if overrides:
        raise DDKitError("the random baseline has no options to override; drop --set")
    return random_subset(real, ipc, seed=seed)
