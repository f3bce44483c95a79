"""Evaluation protocols: train fresh networks on a distilled set and test them on real data.

The hard-label protocol (the DC / DSA / DM papers' evaluation): a fresh network trained from scratch with hard labels, SGD
(lr 0.01, momentum 0.9, weight decay 5e-4), batch 256, DSA with per-sample parameters on every
batch, lr x0.1 at half the epochs (re-creating the optimiser, as the reference does, which resets
momentum), and the FINAL-epoch test accuracy. Nothing is ever selected on the test set.

Runs differ only in their seed (network initialisation, batch order, augmentation draws). The
reported spread is the population standard deviation over runs, as the reference scripts print.

The soft-label protocol of the statistics family (``protocol="soft"``) lives in :mod:`ddkit.evaluate.soft`;
:func:`evaluate` dispatches to it and stores its results the same way.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ddkit.augment import DSA, dsa_strategy_for
from ddkit.data import load_dataset
from ddkit.data.streaming import normalized_split
from ddkit import distributed, precision
from ddkit.errors import DDKitError
from ddkit.evaluate.soft import SOFT_PRESETS, SoftProtocol, recipe_for_set, resolve_soft_config, train_soft
from ddkit.models.convnet import default_depth
from ddkit.models.registry import build, option_names
from ddkit.models.training import (RunCheckpoint, check_compile_available, check_training_options, test_accuracy,
                                   train_classifier)
from ddkit.store import DistilledSet, load
from ddkit.tiers import check_tier, check_tier_table
from ddkit.utils import apply_overrides, check_flag, check_seed, make_generator, normalize, resolve_device, split_names

# A preset is data. Every key is overridable (``--set key=value`` / ``overrides=``).
HARD_PRESETS: dict[str, dict] = check_tier_table({
    "paper": {
        "epochs": 1000, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 256,
        "decay_at": 0.5, "decay_factor": 0.1, "reset_momentum": True, "dsa": True,
        "dsa_strategy": "auto", "model": {}, "eval_batch_size": 1000, "sync_bn": False,
    },
    "quick": {
        "epochs": 300, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 256,
        "decay_at": 0.5, "decay_factor": 0.1, "reset_momentum": True, "dsa": True,
        "dsa_strategy": "auto", "model": {}, "eval_batch_size": 1000, "sync_bn": False,
    },
    "smoke": {
        "epochs": 200, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 256,
        "decay_at": 0.5, "decay_factor": 0.1, "reset_momentum": True, "dsa": True,
        "dsa_strategy": "auto", "model": {"width": 32}, "eval_batch_size": 1000, "sync_bn": False,
    },
}, "HARD_PRESETS")
PROTOCOLS = ("hard", "soft")
ARCHITECTURES = ("convnet", "alexnet", "vgg11", "resnet18", "resnet18_bn", "mlp")


def resolve_config(protocol: str, preset: str, overrides=None, recipe: str = "ddkit") -> dict:
    """The protocol's preset with overrides applied. Unknown protocol/preset/key -> DDKitError.

    ``protocol`` "hard" reads :data:`HARD_PRESETS`, "soft" :data:`ddkit.evaluate.soft.SOFT_PRESETS`
    with the evaluation ``recipe`` over it (:func:`ddkit.evaluate.soft.resolve_soft_config`).
    """
    if protocol not in PROTOCOLS:
        raise DDKitError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
    presets = SOFT_PRESETS if protocol == "soft" else HARD_PRESETS
    check_tier(preset, "evaluation preset")
    config = resolve_soft_config(preset, recipe) if protocol == "soft" else presets[preset]
    return apply_overrides(config, overrides, what="evaluation option")


def default_model_options(arch: str, image_size: int) -> dict:
    """Per-architecture defaults that depend on the image size (ConvNet depth: 3 up to 32 px, 4 at 64 px)."""
    if arch == "convnet":
        return {"depth": default_depth(image_size)}
    return {}


def model_options_for(arch: str, options: dict, preset_options: dict) -> dict:
    """The model options ``arch`` is built with: ``options`` (a resolved config's ``model``) without
    the preset's own options that ``arch`` does not have. The smoke tier's ``width=32`` narrows
    ConvNet-like networks; AlexNet and VGG have no width, and are built as they are. An option an
    override set (a value other than the preset's) is kept, so one the architecture lacks is still
    refused with one line by :func:`ddkit.models.create`."""
    accepted = option_names(arch)
    if accepted is None:
        return dict(options)
    return {key: value for key, value in options.items()
            if key in accepted or key not in preset_options or preset_options[key] != value}


def build_model(arch: str, channels: int, num_classes: int, image_size: int, options: dict, seed: int, device):
    """Create ``arch`` with its initial weights drawn from ``seed`` (global RNG untouched)."""
    merged = {**default_model_options(arch, image_size), **options}
    return build(arch, channels, num_classes, image_size, seed, device, **merged)


@dataclass
class EvalResult:
    """Accuracies of one (protocol, architecture) evaluation over several runs.

    ``accuracies`` are final-epoch test accuracies in percent, one per run.
    """

    protocol: str
    preset: str
    arch: str
    accuracies: list[float]
    seconds_per_run: float
    config: dict
    seeds: list[int]
    device: str
    train_images: int
    date: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    # The call that wrote it trained through torch.compile (the same computation, other float rounding).
    # Runs it took over from an interrupted call, or continued from their epoch checkpoints, may have
    # trained eagerly before: like the device, this describes the execution, not the result.
    compiled: bool = False
    #: the precision of the training passes (ddkit.precision.using), recorded unless fp32
    precision: str = field(default_factory=precision.active)

    @property
    def mean(self) -> float:
        """Mean test accuracy over the runs, in percent."""
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        """Population standard deviation of the runs' test accuracies, in percent."""
        return float(np.std(self.accuracies))

    def summary(self) -> str:
        """``"48.90 +- 0.31"``: mean +- population std in percent; ``"48.90 (1 run)"`` for one run."""
        return accuracy_text(self.mean, self.std, len(self.accuracies))

    def to_record(self) -> dict:
        """The JSON record stored in the set's manifest."""
        return {
            "protocol": self.protocol, "preset": self.preset, "arch": self.arch,
            "accuracies": [round(a, 4) for a in self.accuracies], "mean": round(self.mean, 4),
            "std": round(self.std, 4), "seconds_per_run": round(self.seconds_per_run, 2),
            "seeds": self.seeds, "device": self.device, "train_images": self.train_images,
            "config": self.config, "date": self.date,
            **({"compiled": True} if self.compiled else {}),
            **({"precision": self.precision} if self.precision != "fp32" else {}),
        }


def accuracy_text(mean: float, std: float, runs: int | None) -> str:
    """``"48.90 +- 0.31"`` (percent, mean +- population std over ``runs``), or ``"48.90 (1 run)"``:
    one run has no spread to show, and "+- 0.00" would claim one."""
    if runs == 1:
        return f"{float(mean):.2f} (1 run)"
    return f"{float(mean):.2f} +- {float(std):.2f}"


def _flat(config: dict, prefix: str = "") -> dict:
    """``{"model": {"width": 32}}`` -> ``{"model.width": 32}`` (dotted keys, as ``--set`` spells them)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def option_changes(protocol: str, preset: str, config: dict | None) -> list[str]:
    """``key=value`` for every option of a stored evaluation's resolved ``config`` that differs from
    its ``preset`` (what ``--set`` changed), sorted; [] when it ran at the preset as it is.

    Options the evaluation derives rather than takes (the soft protocol's ``loss`` resolved from
    ``auto``, ``targets``, ``teacher_info``) and options a record predates are not changes. Added
    ``model.*`` factory options are.
    """
    if not isinstance(config, dict):
        return []
    try:
        base = _flat(resolve_config(protocol, preset, None, config.get("recipe") or "ddkit"))
    except DDKitError:  # a preset or recipe this version no longer knows: nothing to compare with
        return []
    changes = []
    for key, value in sorted(_flat(config).items()):
        known = key in base
        if (known and base[key] != "auto" and value != base[key]) or (not known and key.startswith("model.")):
            changes.append(f"{key}={json.dumps(value) if isinstance(value, (list, dict)) else value}")
    return changes


def preset_label(protocol: str, preset: str, config: dict | None) -> str:
    """``"quick"``, or ``"quick, epochs=20"`` for an evaluation whose options differ from its preset
    (:func:`option_changes`): how printed tables and reports name what an evaluation ran at."""
    return ", ".join([preset, *option_changes(protocol, preset, config)])


def check_hard_config(config: dict) -> None:
    """The hard-label protocol's options, refused with one line before any training."""
    check_training_options(config, "evaluation")
    check_flag("evaluation", "dsa", config["dsa"])
    if not isinstance(config["dsa_strategy"], str):
        raise DDKitError(f"evaluation option dsa_strategy={config['dsa_strategy']!r} is not valid; give auto or "
                         f"augmentations joined by '_', e.g. color_crop_cutout_flip_scale_rotate")


def protocol_for_set(distilled, protocol: str, preset: str, overrides=None, teachers=None, teacher_info=None,
                     recipe: str | None = "auto"):
    """(the :class:`SoftProtocol` of ``distilled``, validated, or None for "hard"; the resolved
    options an evaluation stores, soft ones completed from the set's records). ``recipe``: the
    soft protocol's evaluation recipe, ``"auto"`` = the one the set's relabel step named."""
    if protocol != "soft":
        if recipe not in (None, "auto"):
            raise DDKitError(f"--recipe {recipe} is an evaluation recipe of the soft protocol; add --protocol soft")
        config = resolve_config(protocol, preset, overrides)
        check_hard_config(config)
        return None, config
    config = resolve_config(protocol, preset, overrides, recipe_for_set(distilled, recipe))
    soft = SoftProtocol(distilled, config, teachers=teachers, teacher_info=teacher_info)
    return soft, soft.config


def evaluation_config(distilled, protocol: str, preset: str, overrides=None, recipe: str | None = "auto") -> dict:
    """The resolved options an evaluation of ``distilled`` would store, which is what a stored
    evaluation is matched on."""
    return protocol_for_set(distilled, protocol, preset, overrides, recipe=recipe)[1]


def _comparable(config):
    """``config`` without options at a default that changes nothing in one process (``sync_bn``
    false), so records written before such an option existed still match."""
    if not isinstance(config, dict) or config.get("sync_bn", False):
        return config
    return {k: v for k, v in config.items() if k != "sync_bn"}


def _same_settings(record: dict, protocol: str, preset: str, arch: str, config: dict) -> bool:
    return (record.get("protocol"), record.get("preset"), record.get("arch"), _comparable(record.get("config"))) == (
        protocol, preset, arch, _comparable(config))


def finished_record(records: list[dict], protocol: str, preset: str, arch: str, config: dict, seeds: list[int]):
    """The last finished evaluation record among ``records`` (a manifest's ``evaluations``) with
    these settings and exactly these seeds, or None (partial records, see :func:`stored_runs`,
    never count)."""
    for rec in reversed(records):
        if not rec.get("partial") and rec.get("seeds") == seeds and _same_settings(rec, protocol, preset, arch, config):
            return rec
    return None


def find_stored(distilled, protocol: str, preset: str, arch: str, config: dict, seeds: list[int]):
    """An :class:`EvalResult` rebuilt from a finished manifest record with these settings and
    exactly these seeds (:func:`finished_record`), or None."""
    rec = finished_record(distilled.meta.get("evaluations", []), protocol, preset, arch, config, seeds)
    if rec is None:
        return None
    return EvalResult(protocol, preset, arch, list(rec["accuracies"]), rec["seconds_per_run"], config,
                      seeds, rec["device"], rec["train_images"], rec["date"], bool(rec.get("compiled", False)),
                      rec.get("precision", "fp32"))


def stored_runs(distilled, protocol: str, preset: str, arch: str, config: dict, seeds: list[int]):
    """Runs of an evaluation that an interrupted call already finished.

    While an evaluation trains its runs one after another, each finished run is written to the
    manifest in a record marked ``"partial": true`` (replaced by the full record at the end).
    This collects, from the partial records with these settings whose seeds all lie in
    ``seeds``, what each seed gave.

    Returns:
        ({seed: (test accuracy %, seconds of that run)}, [the partial records read]).
    """
    done, partials = {}, []
    for rec in distilled.meta.get("evaluations", []):
        if not rec.get("partial") or not _same_settings(rec, protocol, preset, arch, config):
            continue
        if not set(rec.get("seeds", [])) <= set(seeds):
            continue
        partials.append(rec)
        for run_seed, accuracy in zip(rec["seeds"], rec["accuracies"]):
            done[run_seed] = (float(accuracy), float(rec["seconds_per_run"]))
    return done, partials


EVAL_CHECKPOINT_DIR = "eval-checkpoint"


def eval_checkpoint_name(protocol: str, preset: str, arch: str, seed: int | str) -> str:
    """File name, under ``EVAL_CHECKPOINT_DIR`` of a set, of one evaluation run's epoch checkpoint
    (``seed="*"`` gives the glob pattern of every seed's)."""
    return f"{protocol}-{preset}-{arch}-seed{seed}.safetensors"
EVAL_CHECKPOINT_SECONDS = 60.0  # least time between two epoch checkpoints of an evaluation run (2.5 MB at quick)


def run_checkpoint(distilled, protocol: str, preset: str, arch: str, config: dict, seed: int, fresh: bool = False):
    """The :class:`~ddkit.models.training.RunCheckpoint` of one evaluation run of a saved set, in
    ``SET/eval-checkpoint/``; None for a set that is not saved.

    Its identity is the protocol, preset, architecture, resolved options, seed and the sha256 of
    the set's data file. ``fresh``: delete a checkpoint left by an earlier call, so the run starts
    from its first epoch (``evaluate`` without ``reuse``). Under torchrun every rank calls this
    (rank 0 deletes, and the others wait for it before they look for the file).
    """
    if distilled.path is None:
        return None
    name = eval_checkpoint_name(protocol, preset, arch, seed)
    # the data file's hash as the set was loaded or saved with (checked then; no re-read)
    identity = {"protocol": protocol, "preset": preset, "arch": arch, "config": config, "seed": seed,
                "data_sha256": distilled.data_sha256}
    checkpoint = RunCheckpoint(distilled.path / EVAL_CHECKPOINT_DIR / name, identity, EVAL_CHECKPOINT_SECONDS)
    if fresh:
        checkpoint.remove()
        distributed.barrier()
    return checkpoint


def evaluate(
    distilled,
    protocol: str = "hard",
    preset: str = "quick",
    runs: int = 3,
    archs=None,
    seed: int = 0,
    device: str | None = "cpu",
    overrides=None,
    show_progress: bool = True,
    real=None,
    record: bool = True,
    reuse: bool = False,
    teachers=None,
    teacher_info=None,
    compiled: bool = False,
    recipe: str | None = "auto",
) -> dict[str, EvalResult]:
    """Evaluate a distilled set: train ``runs`` fresh networks per architecture, test on real data.

    Args:
        distilled: a :class:`ddkit.DistilledSet` (or a path to one).
        protocol: "hard" or "soft" (relabel records under an evaluation recipe; see
            :mod:`ddkit.evaluate.soft`).
        preset: "paper" (1000 epochs), "quick" (300), "smoke" (seconds).
        runs: networks per architecture; run r uses seed ``seed + r``.
        archs: model names (``ddkit.models.available()``), e.g. ("convnet", "resnet18"); None: the
            soft recipe's student (``arch``), ConvNet for the hard protocol.
        overrides: dict or ``key=value`` strings over the preset.
        real: the real dataset (loaded from ``distilled.dataset`` when None).
        record: append the results to the set's manifest (rewritten on disk when it was saved).
        reuse: return an evaluation already stored in the manifest with the same protocol, preset,
            architecture, resolved config and seeds instead of training again; of an evaluation
            that was interrupted, train only the runs it had not finished (each finished run is
            stored as it ends, see :func:`stored_runs`), continuing a run that was stopped from
            its last epoch checkpoint (:func:`run_checkpoint`).
        teachers: protocol "soft" only: modules (normalised images -> logits) giving the soft
            targets online on the same replayed inputs, instead of the stored records (put in
            eval mode and moved to ``device``).
        teacher_info: JSON-able description of ``teachers``, stored in the result's config.
        compiled: train through ``torch.compile`` (:class:`ddkit.models.training.DataParallel`):
            the same computation in fused kernels, faster after a first step that compiles. Like
            the device, it is an execution detail: the record says ``"compiled": true``, and a
            stored evaluation is reused (``reuse``) whether it was compiled or not.
        recipe: protocol "soft" only: the evaluation recipe (``ddkit.evaluate.soft.SOFT_RECIPES``,
            e.g. "sre2l-cifar100", or "ddkit" for the shared one); "auto" takes the one the set's
            relabel step named (its method's published recipe).

    Returns:
        {arch: EvalResult}; accuracies in percent.
    """
    if not isinstance(distilled, DistilledSet):
        distilled = load(distilled)
    distilled.check_contents()  # never score an empty or non-finite set as if it were a result
    checkpoints = record  # epoch checkpoints of a recorded run: read by every rank, written by rank 0
    record = record and distributed.current().is_main  # under torchrun, rank 0 writes the manifest
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
        raise DDKitError(f"--runs must be an integer of at least 1, got {runs!r}")
    check_seed("evaluation", seed, count=runs)
    if isinstance(archs, str):  # "convnet" or "convnet,resnet18", as on the command line
        archs = split_names(archs)
    if teachers is not None and protocol != "soft":
        raise DDKitError("teachers= is only used by protocol 'soft'; drop it or pass protocol='soft'")
    soft, config = protocol_for_set(distilled, protocol, preset, overrides, teachers, teacher_info, recipe)
    if not archs:
        archs = [config["arch"]] if soft is not None else ["convnet"]
    device = resolve_device(device)
    if compiled:
        check_compile_available(device)
    if real is None:
        real = load_dataset(distilled.dataset, **distilled.meta.get("dataset_options", {}))
    if real.num_classes != distilled.num_classes or tuple(real.image_shape) != tuple(distilled.image_shape):
        raise DDKitError(
            f"the set has {distilled.num_classes} classes of shape {distilled.image_shape} but {real.name} has "
            f"{real.num_classes} of shape {real.image_shape}; evaluate it against the dataset it was distilled from"
        )
    if soft is None:
        train_images, train_labels = distilled.decoded()
        train_images = normalize(train_images, distilled.mean, distilled.std).to(device)
        train_labels = train_labels.to(device)
        num_train = int(train_images.shape[0])
    else:
        soft_source, train_labels = soft.source(device)
        num_train = soft.num_images
    test_images = normalized_split(real, "test", device)  # streamed per batch for a streaming dataset
    test_labels = real.test.labels.to(device)
    dsa = None
    if soft is None:
        strategy = dsa_strategy_for(real.name) if config["dsa_strategy"] == "auto" else config["dsa_strategy"]
        dsa = DSA(strategy) if config["dsa"] else None
    channels, height, _ = distilled.image_shape

    preset_model = resolve_config(protocol, preset, None, config.get("recipe") or "ddkit")["model"]
    results = {}
    for arch in archs:
        seeds = [seed + r for r in range(runs)]
        stored = find_stored(distilled, protocol, preset, arch, config, seeds) if reuse else None
        if stored is not None:
            results[arch] = stored
            continue
        # Runs finished by an interrupted call: reused with reuse=True, superseded either way.
        done, partials = stored_runs(distilled, protocol, preset, arch, config, seeds)
        if not reuse:
            done = {}
        elif done and show_progress:
            print(f"{arch}: reusing {len(done)} of {runs} runs stored by an interrupted evaluation "
                  f"(seeds {', '.join(map(str, sorted(done)))})", file=sys.stderr, flush=True)
        checkpoint = None
        for run_seed in seeds:
            if run_seed in done:
                continue
            started = time.perf_counter()
            model = build_model(arch, channels, distilled.num_classes, height,
                                model_options_for(arch, config["model"], preset_model), run_seed, device)
            generator = make_generator(run_seed)
            checkpoint = run_checkpoint(distilled, protocol, preset, arch, config, run_seed, fresh=not reuse) \
                if checkpoints else None
            if soft is None:
                train_classifier(model, train_images, train_labels, config, generator, dsa=dsa,
                                 show_progress=show_progress, desc=f"eval {arch} seed {run_seed}", checkpoint=checkpoint,
                                 compiled=compiled)
            else:
                train_soft(model, soft_source, train_labels, config, generator, show_progress=show_progress,
                           desc=f"soft {arch} seed {run_seed}", checkpoint=checkpoint, compiled=compiled)
            accuracy = 100.0 * test_accuracy(model, test_images, test_labels, int(config["eval_batch_size"]))
            done[run_seed] = (accuracy, time.perf_counter() - started + (checkpoint.seconds_before if checkpoint else 0.0))
            if record and len(done) < len(seeds):
                # A run can take an hour on a CPU: keep it, so that an interrupted call resumes here.
                finished = [s for s in seeds if s in done]
                partial = EvalResult(protocol, preset, arch, [done[s][0] for s in finished],
                                     float(np.mean([done[s][1] for s in finished])), config, finished,
                                     str(device), num_train, compiled=compiled).to_record()
                partial.update(partial=True, runs_planned=len(seeds))
                distilled.record_evaluation(partial, replacing=partials)
                partials = [partial]
                if checkpoint is not None:  # only now: a stop before the record would lose the run
                    checkpoint.remove()
        results[arch] = EvalResult(protocol, preset, arch, [done[s][0] for s in seeds],
                                   float(np.mean([done[s][1] for s in seeds])), config, seeds, str(device), num_train,
                                   compiled=compiled)
        if record:
            distilled.record_evaluation(results[arch].to_record(), replacing=partials)
            if checkpoint is not None:
                checkpoint.remove()
    return results
