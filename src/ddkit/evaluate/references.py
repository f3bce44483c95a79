"""Reference accuracies that scores are measured against, cached so every grid reuses them.

The **full-data reference** (:func:`full_data_reference`) trains the evaluation network on the
whole training split under the hard-label protocol of a tier, with the tier's options but fewer
epochs (:data:`FULL_DATA_EPOCHS`: every epoch of the full split is thousands of steps, where an
IPC-10 set has one), and tests it on the test split. It is what DD-Ranking's hard-label recovery
(:mod:`ddkit.evaluate.scores`) subtracts a set's hard-label accuracy from.

Results are cached as JSON under ``$DDKIT_DATA/references/<dataset>/``, keyed by the dataset,
architecture, tier, the resolved training options and the seeds, so a second grid (or a second
process) reads the number instead of training again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ddkit.data import load_dataset
from ddkit.data.core import data_root
from ddkit.errors import DDKitError
from ddkit.evaluate.protocols import evaluate, resolve_config
from ddkit.store import DistilledSet
from ddkit.tiers import check_tier, check_tier_table
from ddkit.utils import holding_lock, write_json_atomic

#: Epochs over the whole training split of each tier's full-data reference (ddkit's choice; the
#: other options are the tier's hard-label protocol, learning-rate decay at half of these epochs).
FULL_DATA_EPOCHS: dict[str, int] = check_tier_table({"smoke": 20, "quick": 5, "paper": 100}, "FULL_DATA_EPOCHS")
REFERENCES_DIR = "references"


def full_data_config(preset: str, overrides=None) -> dict:
    """The hard-label training options of the full-data reference at tier ``preset``."""
    check_tier(preset)
    return resolve_config("hard", preset, {"epochs": FULL_DATA_EPOCHS[preset], **dict(overrides or {})})


def reference_path(dataset: str, arch: str, preset: str, config: dict, seeds: list[int]) -> Path:
    """Where the full-data reference of these settings is cached (a JSON file)."""
    digest = hashlib.sha256(json.dumps({"config": config, "seeds": seeds}, sort_keys=True,
                                       default=str).encode()).hexdigest()[:12]
    folder = dataset.replace(":", "_").replace("/", "_")
    return data_root() / REFERENCES_DIR / folder / f"full-data-{arch}-{preset}-{digest}.json"


def full_data_reference(dataset: str, arch: str = "convnet", preset: str = "quick", runs: int = 1, seed: int = 0,
                        device="cpu", show_progress: bool = True, compiled: bool = False, overrides=None) -> dict:
    """The full-data hard-label accuracy of ``arch`` on ``dataset`` at tier ``preset`` (cached).

    Returns:
        ``{"dataset", "arch", "preset", "mean", "std", "accuracies", "seeds", "config",
        "seconds_per_run", "path"}``; accuracies in percent, one per run (seeds ``seed`` ..
        ``seed + runs - 1``).

    Raises:
        DDKitError: an unknown tier or architecture, a dataset that is not set up.
    """
    config = full_data_config(preset, overrides)
    seeds = [seed + r for r in range(runs)]
    path = reference_path(dataset, arch, preset, config, seeds)
    cached = _read(path)
    if cached is not None:
        return cached
    path.parent.mkdir(parents=True, exist_ok=True)
    with holding_lock(path.with_suffix(".lock")):
        cached = _read(path)  # another process may have finished it while this one waited
        if cached is not None:
            return cached
        real = load_dataset(dataset)
        whole = DistilledSet(images=real.train.images.float() / 255.0, labels=real.train.labels.clone(),
                             class_names=list(real.class_names), dataset=real.name, mean=real.mean, std=real.std,
                             method="full-data", meta={"config": {"selection": "the whole training split"}})
        result = evaluate(whole, protocol="hard", preset=preset, runs=runs, archs=[arch], seed=seed,
                          overrides={"epochs": config["epochs"], **dict(overrides or {})}, real=real, device=device,
                          show_progress=show_progress, record=False, compiled=compiled)[arch]
        entry = {"dataset": real.name, "arch": arch, "preset": preset, "mean": round(result.mean, 4),
                 "std": round(result.std, 4), "accuracies": [round(float(a), 4) for a in result.accuracies],
                 "seeds": seeds, "config": config, "seconds_per_run": round(float(result.seconds_per_run), 2),
                 "train_images": int(real.train.images.shape[0])}
        write_json_atomic(path, entry)
    return {**entry, "path": str(path)}


def _read(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return {**json.loads(path.read_text()), "path": str(path)}
    except (OSError, ValueError) as exc:
        raise DDKitError(f"cannot read the cached reference {path} ({exc}); delete it to measure it again") from None
