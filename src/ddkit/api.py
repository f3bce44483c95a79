"""The top-level Python API: ``ddkit.distill``, ``ddkit.load``, ``ddkit.evaluate``."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import torch

from ddkit import distributed, precision
from ddkit.checkpoint import LATEST, load_tensors, read_run, save_tensors_atomic
from ddkit.data import load_dataset
from ddkit.errors import DDKitError
from ddkit.methods import get_spec, stats_family
from ddkit.methods.matching import NonFiniteLoss
from ddkit.methods.pretrained import is_external
from ddkit.models.training import check_compile_available
from ddkit.store.distilled import run_lock
from ddkit.utils import check_seed, peak_memory_bytes, resolve_device

CHECKPOINT_DIR = "checkpoint"
PARTS_DIR = ".parts"
#: Method flags a checkpoint records so that ``resume`` runs the same thing (all JSON values).
RESUMED_FLAGS = ("terms", "weights", "teacher_paths", "relabel")


def distill(
    method: str,
    dataset: str,
    ipc: int,
    preset: str = "quick",
    seed: int = 0,
    device: str | None = "cpu",
    overrides=None,
    show_progress: bool = True,
    out: str | Path | None = None,
    image_size: int | None = None,
    checkpoint_every: int = 0,
    checkpoint_seconds: float = 180.0,
    resume: bool = False,
    compiled: bool = False,
    **flags,
):
    """Distill ``dataset`` into ``ipc`` synthetic images per class with ``method``.

    Args:
        method: a registered method name (``ddkit.methods.SPECS``), e.g. "dm".
        dataset: a real dataset name (``ddkit data list``).
        ipc: synthetic images per class.
        preset: "smoke" | "quick" | "paper".
        seed: seeds every random draw of the run.
        device: "cpu", "cuda", "auto" (one GPU per process in a torchrun job: ``cuda:LOCAL_RANK``).
        overrides: dict or ``key=value`` strings over the preset's options.
        out: when given, the set is saved there (atomically); checkpoints go to ``out/checkpoint``.
        checkpoint_every: iterations between checkpoints (needs ``out``; every method but random);
            0 = about every ``checkpoint_seconds`` of work, measured over the first iterations. The
            statistics family also stores every finished recover batch.
        resume: continue from the latest checkpoint in ``out`` (same tensors as an uninterrupted run).
        compiled: run through ``torch.compile``: the matching family's network forward (1.5x to
            1.7x faster per quick IPC-50 iteration on a CPU, after a first iteration that compiles
            for half a minute; docs/benchmarks.md), and the training of any teacher or IID feature
            extractor not cached yet. An execution detail like the device: the set's manifest says
            ``"compiled": true``, and a run may resume compiled or not. Methods with nothing to
            compile (random) ignore it.
        flags: method-specific switches (e.g. ``terms=``, ``weights=`` for the matching family).

    Under ``torchrun`` (``WORLD_SIZE > 1``) each process distils its share of the classes, writes
    its part to ``out/.parts`` and rank 0 merges the parts into the set; see docs/scaling.md.

    Raises:
        DDKitError: bad input; or a NaN/infinite loss, after saving the last good images to ``out``.

    Returns:
        A :class:`ddkit.DistilledSet` (images float32 [K*ipc, C, H, W] in [0, 1]); under torchrun
        every rank returns the merged set once rank 0 has saved it.
    """
    spec = get_spec(method)
    check_seed("distillation", seed)
    device = resolve_device(device)
    compiled = bool(compiled) and spec.compile
    if compiled:
        check_compile_available(device)
    world = distributed.setup(device)
    device = distributed.process_device(device)
    held = contextlib.ExitStack()
    try:
        if world.distributed and out is None:
            raise DDKitError("a multi-process run needs --out (the ranks exchange their parts through it)")
        if world.distributed and not spec.splits_work:
            raise DDKitError(f"{method} does not split across processes; run it in one process")
        if out is not None:
            _hold_run_lock(held, out, method, world)
        checkpoint = _checkpoint_spec(spec, method, dataset, ipc, preset, seed, overrides, out, image_size,
                                      checkpoint_every, checkpoint_seconds, resume, flags)
        if checkpoint is not None:
            flags["checkpoint"] = checkpoint
        if compiled:
            flags["compiled"] = True
        merged = False
        if world.distributed and spec.merges_parts:
            # methods that finish with a stage on the whole set (relabel) merge the parts before it
            def merge(partial):
                nonlocal merged
                _merge_parts(partial, Path(out), world)
                merged = True

            flags["merge_parts"] = merge
        real = load_dataset(dataset, image_size=image_size)
        started = time.perf_counter()
        try:
            result = spec.run(real, ipc, preset=preset, overrides=overrides, seed=seed, device=device,
                        show_progress=show_progress and world.is_main, **flags)
        except NonFiniteLoss as exc:
            kept = f"; the last checkpoint is kept in {out}/{CHECKPOINT_DIR}" if checkpoint else ""
            if exc.partial is not None and out is not None and not world.distributed:
                try:
                    exc.partial.save(out)
                except DDKitError:  # the images went non-finite too: no set is better than a broken one
                    raise DDKitError(f"{exc}; the images were not finite either, so no set was saved{kept}") from None
                raise DDKitError(f"{exc}; the last good images were saved in {out}{kept}") from None
            raise DDKitError(f"{exc}{kept}") from None
        result.meta.setdefault("timings", {})["distill_seconds"] = round(time.perf_counter() - started, 3)
        result.meta["peak_memory_bytes"] = peak_memory_bytes(device)
        result.meta.setdefault("preset", preset)
        result.meta.setdefault("device", str(device))
        if compiled:
            result.meta["compiled"] = True
        result.meta["precision"] = precision.active()  # of the network passes (ddkit.precision.using)
        if world.distributed:
            result.meta["processes"] = world.size
            if not merged:
                _merge_parts(result, Path(out), world)
        if image_size:
            result.meta["dataset_options"] = {"image_size": image_size}
        if out is not None and world.is_main:
            result.save(out)
            shutil.rmtree(Path(out) / CHECKPOINT_DIR, ignore_errors=True)
        distributed.barrier()
        return result
    finally:
        held.close()
        distributed.teardown()


def _hold_run_lock(held: contextlib.ExitStack, out, method: str, world) -> None:
    """Enter the run lock of ``out`` into ``held`` on rank 0 (the rank that saves); every rank
    raises the same one-line DDKitError when another process holds it, so none waits for the rest."""
    refusal = None
    if world.is_main:
        try:
            held.enter_context(run_lock(out, f"ddkit distill {method}"))
        except DDKitError as exc:
            refusal = str(exc)
    if distributed.broadcast_int(0 if refusal else 1) == 0:
        raise DDKitError(refusal or f"another ddkit process is writing {out}; wait for it to finish or choose "
                                    f"another --out")


def _checkpoint_spec(spec, method, dataset, ipc, preset, seed, overrides, out, image_size, every, seconds, resume,
                     flags) -> dict | None:
    """The engine's checkpoint settings, or None where checkpoints do not apply."""
    if out is None or not spec.checkpoints:
        if resume:
            raise DDKitError(f"--resume needs --out and a method that checkpoints (every method but random); "
                             f"{method} does not checkpoint")
        return None
    root = Path(out) / CHECKPOINT_DIR
    if not resume and (root / LATEST).is_file():
        raise DDKitError(f"{out} holds a checkpoint of an unfinished run; continue it with --resume {out} "
                         f"or remove {root}")
    if isinstance(overrides, dict):
        options = dict(overrides)
    else:
        options = list(overrides or [])
    if flags.get("teacher_paths"):  # a resume may start from another directory
        flags["teacher_paths"] = [path if is_external(path) else str(Path(path).resolve())
                                  for path in flags["teacher_paths"]]
    run = {"method": method, "dataset": dataset, "ipc": ipc, "preset": preset, "seed": seed, "overrides": options,
           "image_size": image_size, "flags": {k: v for k, v in flags.items() if k in RESUMED_FLAGS}}
    return {"dir": str(root), "every": int(every), "seconds": float(seconds), "resume": bool(resume), "run": run}


def _merge_parts(result, out: Path, world) -> None:
    """Every rank writes its images (and, for per-batch work, its loss log) to ``out/.parts``
    (atomically); every rank reads all parts, so each holds the merged images; rank 0 saves them."""
    parts = out / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    rows = getattr(result, "computed_rows", None)
    per_batch_log = rows is not None  # the recover family logs each batch where it ran
    if rows is None:  # the matching family: this rank's share of the classes (its log is all-reduced)
        classes = torch.tensor(world.share(result.num_classes))
        rows = torch.nonzero(torch.isin(result.labels, classes)).flatten()
    log = (result.meta.get("loss_log") or []) if per_batch_log else []
    save_tensors_atomic(parts / f"rank{world.rank}.safetensors", {"images": result.images[rows], "rows": rows},
                        {"log": log})
    distributed.barrier()
    merged_log = []
    for rank in range(world.size):
        part, state = load_tensors(parts / f"rank{rank}.safetensors")
        result.images[part["rows"]] = part["images"]
        merged_log += state["log"]
    if per_batch_log:
        result.meta["loss_log"] = sorted(merged_log, key=lambda entry: (entry.get("batch", 0), entry["iteration"]))
    distributed.barrier()
    if world.is_main:
        shutil.rmtree(parts, ignore_errors=True)


def resume(out: str | Path, device: str | None = None, show_progress: bool = True, **options):
    """Continue the interrupted run whose checkpoint is in ``out`` (its method, dataset, IPC, preset,
    seed and options are read from the checkpoint). Returns the finished set."""
    run = read_run(Path(out) / CHECKPOINT_DIR)
    return distill(run["method"], dataset=run["dataset"], ipc=run["ipc"], preset=run["preset"], seed=run["seed"],
                   device=device or "cpu", overrides=run["overrides"], show_progress=show_progress, out=out,
                   image_size=run.get("image_size"), resume=True, **run.get("flags", {}), **options)


def relabel(distilled, like: str, preset: str = "quick", seed: int = 0, device: str | None = "cpu", overrides=None,
            teacher_paths=None, show_progress: bool = True, compiled: bool = False, class_check: bool = True,
            save_to=None):
    """``distilled`` relabelled as statistics method ``like`` relabels its own sets: its teachers
    (trained or loaded from the cache, or the squeezed teacher folders ``teacher_paths``) store
    per-(epoch, sample) soft-label records under its relabel options at ``preset``.

    Args:
        distilled: any :class:`ddkit.DistilledSet` (its images are kept; a random subset, an
            imported set ...).
        like: a statistics method (``sre2l``, ``cda``, ``gvbsm``): whose teachers and relabel options.
        overrides: its options, as for :func:`distill` (``relabel.epochs=50``).
        compiled: teachers not cached yet train through ``torch.compile``.
        class_check: check that teachers from outside ddkit (``teacher_paths`` such as
            ``torchvision:resnet18``, or a preset's pretrained ones) order the classes as the dataset
            does (:func:`ddkit.methods.pretrained.check_class_order`); False skips it.
        save_to: the folder the result will be saved to; with ``relabel.shard_epochs`` > 0 the
            shards of records are staged beside it, on the same disk
            (:func:`ddkit.methods.stats_family.shard_staging`), until the set is saved.

    Returns:
        A new DistilledSet with the records in ``extras`` and, in ``meta``, ``relabelled_like``
        ``{"method", "preset"}`` and the ``squeeze_seconds`` / ``relabel_seconds`` timings; it
        evaluates with ``protocol="soft"``.
    """
    device = resolve_device(device)
    real = load_dataset(distilled.dataset, **distilled.meta.get("dataset_options", {}))
    config = stats_family.resolve_preset(like, real.name, distilled.ipc, preset, overrides, real=real)
    started = time.perf_counter()
    if teacher_paths:
        teachers = stats_family.outside_teachers(teacher_paths, real, device, class_check)
    else:
        teachers = stats_family.method_teachers(real, config, seed, device, show_progress, compiled=compiled)
        if class_check:
            stats_family.check_pretrained(teachers, config, real, device)
    squeezed = time.perf_counter()
    # Shards are staged on the disk the set goes to; without save_to, relabel() uses a temporary folder.
    shard_dir = None
    if config["relabel"].get("shard_epochs") and save_to is not None:
        shard_dir = stats_family.shard_staging(Path(save_to) / "x")
    result = stats_family.relabel_with(distilled, teachers, config, seed, device, show_progress, shard_dir=shard_dir)
    timings = result.meta.setdefault("timings", {})
    timings["squeeze_seconds"] = round(squeezed - started, 3)
    timings["relabel_seconds"] = round(time.perf_counter() - squeezed, 3)
    result.meta["relabelled_like"] = {"method": like, "preset": preset}
    return result
