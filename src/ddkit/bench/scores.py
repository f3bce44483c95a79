"""DD-Ranking's scores of the bench's cells (:mod:`ddkit.evaluate.scores`): what each cell needs
beyond its own evaluation, and the scores of a result line against its baseline's.

A cell's baseline is the random real subset of the same size for a hard-label method, and
``random+M`` (the subset relabelled with M's teachers, evaluated under M's protocol) for a
soft-label method M, so IOR compares the same labels and the same training. ``bench --scores``
adds to each line:

* ``hard_mean`` / ``hard_std``: the set under the hard-label protocol (a soft-label set's images
  with their class labels; for a hard-label set, its own evaluation);
* ``plain_mean`` / ``plain_std``: the set under its protocol with the evaluation's augmentation
  off: ``dsa=false`` for the hard-label protocol; for the soft-label protocol the images
  themselves, labelled online by the method's (cached) teachers (``online.augment=false``)
  instead of the recorded augmented views;
* ``full_data_hard``: the cached full-data reference (:mod:`ddkit.evaluate.references`).
"""

from __future__ import annotations

from pathlib import Path

import ddkit
from ddkit.bench.cells import BASELINE, relabelled_baseline, relabelled_method
from ddkit.evaluate.references import full_data_reference
from ddkit.evaluate.scores import SCORE_NAMES, set_scores
from ddkit.data import load_dataset
from ddkit.methods import SPECS, stats_family

#: Evaluation options of the without-augmentation evaluation, per protocol.
PLAIN_OVERRIDES = {"hard": {"dsa": False}, "soft": {"online.augment": False}}
#: Runs of the full-data reference (one: each is thousands of steps over the whole training split).
REFERENCE_RUNS = 1


def baseline_method(method: str) -> str | None:
    """The method whose line a cell of ``method`` is scored against: ``random`` for a hard-label
    method, ``random+M`` for a soft-label method M; None for the baselines themselves."""
    if method == BASELINE or relabelled_method(method):
        return None
    spec = SPECS.get(method)
    if spec is not None and spec.protocol == "soft" and spec.relabel_baseline:
        return relabelled_baseline(method)
    return BASELINE


def _same_cell_key(line: dict) -> tuple:
    return tuple(line.get(key) for key in ("dataset", "ipc", "arch", "tier", "runs", "seed"))


def baseline_line(line: dict, lines: list[dict]) -> dict | None:
    """The finished line of ``line``'s baseline among ``lines`` (same dataset, IPC, architecture,
    tier, runs and seed), or None."""
    wanted = baseline_method(str(line.get("method")))
    if wanted is None:
        return None
    key = _same_cell_key(line)
    found = [other for other in lines if other.get("method") == wanted and "error" not in other
             and _same_cell_key(other) == key]
    return found[-1] if found else None


def line_scores(line: dict, lines: list[dict]) -> dict[str, float]:
    """HLR, IOR, LRS and ARS of a result line, as far as its fields and its baseline's allow."""
    if "error" in line:
        return {}
    base = baseline_line(line, lines)
    hard = line.get("hard_mean", line.get("mean") if line.get("protocol") == "hard" else None)
    return set_scores(line.get("mean"), None if base is None else base.get("mean"), set_hard=hard,
                      full_data_hard=line.get("full_data_hard"), set_plain=line.get("plain_mean"),
                      random_plain=None if base is None else base.get("plain_mean"))


def needs_score_inputs(line: dict) -> bool:
    """Whether ``bench --scores`` still has evaluations to run for this (finished) line."""
    if "error" in line:
        return False
    wanted = ["full_data_hard"]
    wanted += ["hard_mean"] if line.get("protocol") != "hard" else []
    wanted += ["plain_mean"] if PLAIN_OVERRIDES.get(line.get("protocol")) is not None else []
    return any(name not in line for name in wanted)


def add_score_inputs(line: dict, out: Path, device, show_progress: bool = True, compiled: bool = False) -> dict:
    """``line`` with the fields scores need (see the module's docstring), evaluating its set
    (``out / line["set"]``) where they are missing; evaluations stored in the set are reused."""
    line = dict(line)
    tier, runs, seed, arch = line["tier"], int(line["runs"]), int(line["seed"]), line["arch"]
    evaluate = {"preset": tier, "runs": runs, "archs": [arch], "seed": seed, "device": device,
                "show_progress": show_progress, "reuse": True, "compiled": compiled}
    distilled = None
    if "hard_mean" not in line and line.get("protocol") != "hard":
        distilled = ddkit.load(out / line["set"])
        result = ddkit.evaluate(distilled, protocol="hard", **evaluate)[arch]
        line["hard_mean"], line["hard_std"] = round(result.mean, 4), round(result.std, 4)
    plain = PLAIN_OVERRIDES.get(line.get("protocol"))
    if "plain_mean" not in line and plain is not None:
        distilled = distilled or ddkit.load(out / line["set"])
        if line["protocol"] == "soft":  # the images labelled online by the teachers that relabelled them
            teachers = relabel_teachers(line, device, show_progress, compiled)
            evaluate.update(teachers=[teacher.model for teacher in teachers],
                            teacher_info=[teacher.info() for teacher in teachers])
        result = ddkit.evaluate(distilled, protocol=line["protocol"], overrides=plain, **evaluate)[arch]
        line["plain_mean"], line["plain_std"] = round(result.mean, 4), round(result.std, 4)
    if "full_data_hard" not in line:
        reference = full_data_reference(line["dataset"], arch, tier, runs=REFERENCE_RUNS, seed=seed, device=device,
                                        show_progress=show_progress, compiled=compiled)
        line["full_data_hard"] = reference["mean"]
        line["full_data_reference"] = {"runs": REFERENCE_RUNS, "epochs": reference["config"]["epochs"],
                                       "train_images": reference["train_images"]}
    return line


def relabel_teachers(line: dict, device, show_progress: bool = True, compiled: bool = False) -> list:
    """The teachers that relabelled a soft-label cell's set: its method's (M's, for ``random+M``)
    at the line's tier and seed, from the teacher cache (trained there if missing)."""
    method = relabelled_method(str(line["method"])) or str(line["method"])
    real = load_dataset(line["dataset"])
    config = stats_family.resolve_preset(method, real.name, int(line["ipc"]), line["tier"], real=real)
    return stats_family.method_teachers(real, config, int(line["seed"]), device, show_progress, compiled=compiled)


def score_columns(lines: list[dict]) -> tuple[str, ...]:
    """The score columns a table of ``lines`` shows: those at least one line has a value for."""
    present = set()
    for line in lines:
        present |= set(line_scores(line, lines))
    return tuple(name for name in SCORE_NAMES if name in present)
