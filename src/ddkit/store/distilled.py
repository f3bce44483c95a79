"""The distilled-set directory format.

A set is a directory holding

- ``data.safetensors``: ``images`` (float32 or uint8, pixel space [0, 1] / [0, 255]),
  ``labels`` (int64) and optionally ``soft_labels``. safetensors holds raw tensors only, so loading
  a set from a stranger never executes code (no pickle anywhere).
- ``manifest.json``: format version, method, dataset, class names, image shape, normalisation,
  IPC, how the stored images decode into training images, the resolved configuration, seeds,
  versions, timings, peak memory, the sha256 of ``data.safetensors`` and evaluation results.
- ``grid.png``: the stored images, one row per class.

Writes are atomic: a whole set is written into a sibling temporary directory and renamed into
place (a failed re-save rolls back; see :meth:`DistilledSet.save`); the manifest alone is
rewritten through a temporary file and ``os.replace``. Loading checks the format version and the
hash and refuses a damaged or edited set with one line.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ddkit.augment.partition import decode_images
from ddkit.errors import DDKitError
from ddkit.utils import default_mode, sha256_of, write_json_atomic

FORMAT_NAME = "ddkit-distilled-set"
FORMAT_VERSION = 1
DATA_FILE = "data.safetensors"
MANIFEST_FILE = "manifest.json"
GRID_FILE = "grid.png"
RETIRED_MARK = ".old-"  # a save parks the previous set in a sibling ".NAME.old-XXXX/set"
#: tensor names of data.safetensors with a fixed meaning; everything else is an extra
RESERVED_TENSORS = ("images", "labels", "soft_labels")


def runtime_versions() -> dict:
    """Library, torch and Python versions, recorded in every manifest."""
    import ddkit

    return {
        "ddkit": ddkit.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


@dataclass
class DistilledSet:
    """A distilled (synthetic) dataset plus everything needed to evaluate and reproduce it.

    Attributes:
        images: float32 [N, C, H, W], pixel space [0, 1] (stored images; see ``decode``).
        labels: int64 [N], class index of each stored image.
        class_names: one name per class; ``len(class_names)`` is the number of classes.
        dataset: name of the real dataset it was distilled from (its test split judges it).
        mean, std: per-channel normalisation constants of that dataset.
        method: the method that made it ("random", "dm", ...).
        decode: how stored images become training images: ``{"kind": "identity"}`` or
            ``{"kind": "partition", "factor": 2}`` (IDM).
        soft_labels: optional float [N, K] teacher logits (one fixed label per stored image).
        extras: further named tensors stored beside the images, e.g. the per-(epoch, sample)
            soft-label replay records of the statistics-matching family (keys ``relabel.*``).
        meta: everything else of the manifest: config, seeds, timings, evaluations, ...
        path: directory it was loaded from or saved to, if any.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    dataset: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    method: str = "unknown"
    decode: dict = field(default_factory=lambda: {"kind": "identity"})
    soft_labels: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __post_init__(self):
        if self.images.dim() != 4:
            raise DDKitError(f"images must be [N, C, H, W], got shape {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DDKitError(
                f"{self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}; give one label per image"
            )
        if self.labels.is_floating_point() or self.labels.is_complex() or self.labels.dtype == torch.bool:
            raise DDKitError(f"labels must be class indices (an integer tensor), got dtype {self.labels.dtype}")
        self.labels = self.labels.to(torch.int64)
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            raise DDKitError(f"labels run from {int(self.labels.min())} to {int(self.labels.max())}, but there are "
                             f"{len(self.class_names)} class names; give labels 0 to {len(self.class_names) - 1}")
        clash = set(self.extras) & set(RESERVED_TENSORS)
        if clash:
            raise DDKitError(f"extra tensor names {sorted(clash)} are reserved; rename them")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)

    # ---- shape facts -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of classes of the source dataset."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the stored images."""
        return tuple(self.images.shape[1:])

    @property
    def ipc(self) -> int:
        """Stored images per class (the largest class count, should all be equal)."""
        counts = torch.bincount(self.labels, minlength=self.num_classes)
        return int(counts.max()) if counts.numel() else 0

    @property
    def decode_factor(self) -> int:
        """Training images per stored image (1, or factor**2 for partition sets)."""
        if self.decode.get("kind") == "partition":
            return int(self.decode["factor"]) ** 2
        return 1

    # ---- training view -----------------------------------------------------------------------
    def decoded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Training images and labels after decoding: (float [M, C, H, W], int64 [M]).

        Pixel space; matching methods optimise without a clamp (as the papers do), so values may lie
        slightly outside [0, 1]. Grids and exports clip; training uses the values as stored.
        """
        with torch.no_grad():
            images, labels = decode_images(self.images.float(), self.labels, self.decode)
        return images, labels

    def as_dataset(self) -> torch.utils.data.TensorDataset:
        """A torch Dataset of (image float [C, H, W] in [0, 1], label int64) decoded training pairs.

        Soft labels, when present, are added as a third element per sample (stored-image order;
        only for identity-decoded sets).
        """
        images, labels = self.decoded()
        if self.soft_labels is not None and self.decode_factor == 1:
            return torch.utils.data.TensorDataset(images, labels, self.soft_labels.float())
        return torch.utils.data.TensorDataset(images, labels)

    @property
    def has_soft_labels(self) -> bool:
        """True when the set carries soft labels: fixed ``soft_labels`` or relabel records."""
        return self.soft_labels is not None or any(k.startswith("relabel.") for k in self.extras)

    def stored_bytes(self) -> dict[str, int]:
        """Bytes of the tensors as stored: ``{"images": .., "labels": .., "soft_labels": ..}``.

        ``soft_labels`` counts the fixed soft labels and every ``relabel.*`` record (crop, flip and
        mix parameters and logits); other extras count under ``other``.
        """
        size = lambda t: int(t.numel() * t.element_size())  # noqa: E731
        soft = (size(self.soft_labels) if self.soft_labels is not None else 0) + sum(
            size(t) for k, t in self.extras.items() if k.startswith("relabel."))
        other = sum(size(t) for k, t in self.extras.items() if not k.startswith("relabel."))
        return {"images": size(self.images), "labels": size(self.labels), "soft_labels": soft, "other": other}

    # ---- persistence -------------------------------------------------------------------------
    def manifest(self, sha256: str | None = None) -> dict:
        """The manifest dictionary as written to ``manifest.json``."""
        meta = dict(self.meta)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "method": self.method,
            "dataset": self.dataset,
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "num_images": int(self.images.shape[0]),
            "ipc": self.ipc,
            "decode": self.decode,
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "has_soft_labels": self.has_soft_labels,
            "sha256": {DATA_FILE: sha256},
        }
        manifest.setdefault("created", meta.pop("created", _dt.datetime.now(_dt.timezone.utc).isoformat()))
        manifest["versions"] = meta.pop("versions", runtime_versions())
        for key, empty in (("config", {}), ("seeds", {}), ("timings", {}), ("peak_memory_bytes", None),
                           ("evaluations", [])):
            manifest[key] = meta.pop(key, empty)
        manifest.update(meta)
        return manifest

    def save(self, directory: str | Path, grid: bool = True) -> Path:
        """Write the set to ``directory`` atomically (replacing an existing set there).

        Everything is written into a temporary sibling directory first and renamed into place,
        so a crash never leaves a half-written set under ``directory``. Replacing a set takes two
        renames (old set aside, new set in); an exception at any step restores the old set and
        the user's files it held. A hard kill between the renames leaves ``directory`` missing and
        the old set in ``.NAME.old-XXXX/set``, which :func:`load` then names.

        Returns:
            The directory path.
        """
        directory = Path(directory)
        # Renames work on the resolved path: with "runs/x/../x" or ".", the parent named in the
        # path would stop existing once the old set is moved aside.
        target = directory.resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        run_state = {"checkpoint", ".parts"}  # written into --out while a run is in progress
        if target.exists() and not (target / MANIFEST_FILE).exists() and any(
                item.name not in run_state for item in target.iterdir()):
            raise DDKitError(
                f"{directory} exists and is not a distilled set; choose another --out or remove it"
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        carried: list[str] = []  # names of the user's files moved from target into staging
        retired: Path | None = None
        try:
            tensors = {"images": self.images.detach().cpu().contiguous(), "labels": self.labels.cpu().contiguous()}
            if self.soft_labels is not None:
                tensors["soft_labels"] = self.soft_labels.detach().cpu().contiguous()
            for name, tensor in self.extras.items():
                tensors[name] = tensor.detach().cpu().contiguous()
            save_file(tensors, str(staging / DATA_FILE), metadata={"format": FORMAT_NAME})
            os.chmod(staging / DATA_FILE, default_mode())
            os.chmod(staging, default_mode(directory=True))
            digest = sha256_of(staging / DATA_FILE)
            write_json_atomic(staging / MANIFEST_FILE, self.manifest(sha256=digest))
            if grid:
                from ddkit.store.grid import save_grid

                save_grid(self.images, self.labels, self.class_names, staging / GRID_FILE)
            # Keep files the set's directory already had that are not part of the format
            # (logs, checkpoints), so a re-save never loses a user's data.
            if target.exists():
                for item in target.iterdir():
                    if item.name not in (DATA_FILE, MANIFEST_FILE, GRID_FILE) and not (staging / item.name).exists():
                        os.replace(item, staging / item.name)
                        carried.append(item.name)
                # POSIX has no atomic swap of two directories: between these two renames
                # the old set lives in retired/ (load() points there if a crash hits now).
                retired = Path(tempfile.mkdtemp(prefix=f".{target.name}{RETIRED_MARK}", dir=target.parent))
                os.replace(target, retired / "set")
                os.replace(staging, target)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                os.replace(staging, target)
        except BaseException:
            _roll_back(target, staging, retired, carried)
            raise
        finally:
            # A roll back that itself failed leaves the user's files in staging: keep them then.
            if staging.exists() and not any((staging / name).exists() for name in carried):
                shutil.rmtree(staging, ignore_errors=True)
        self.path = directory
        return directory

    def update_manifest(self) -> None:
        """Rewrite only ``manifest.json`` (e.g. after an evaluation), keeping the stored hash."""
        if self.path is None:
            raise DDKitError("this set has not been saved yet; call save(directory) first")
        digest = sha256_of(self.path / DATA_FILE)
        write_json_atomic(self.path / MANIFEST_FILE, self.manifest(sha256=digest))

    def record_evaluation(self, record: dict, replacing=()) -> None:
        """Store an evaluation record in the manifest metadata (and on disk when saved).

        ``replacing``: records already in the list (compared by identity) that ``record``
        supersedes, e.g. the partial record of an evaluation whose runs are not all done yet;
        they are removed and ``record`` takes the place of the first, else it is appended.
        """
        evaluations = self.meta.setdefault("evaluations", [])
        positions = [i for i, old in enumerate(evaluations) if any(old is r for r in replacing)]
        for i in reversed(positions):
            del evaluations[i]
        evaluations.insert(positions[0] if positions else len(evaluations), record)
        if self.path is not None:
            self.update_manifest()


def _roll_back(target: Path, staging: Path, retired: Path | None, carried: list[str]) -> None:
    """Undo a save that failed part-way: the old set back at ``target`` with the user's files."""
    if retired is not None:
        if (retired / "set").is_dir() and not target.exists():
            os.replace(retired / "set", target)
        if not any(retired.iterdir()):  # else it holds the old set still: load() names it
            retired.rmdir()
    if target.is_dir() and staging.is_dir():
        for name in carried:
            if (staging / name).exists() and not (target / name).exists():
                os.replace(staging / name, target / name)


def interrupted_save(directory: Path) -> Path | None:
    """The old copy of the set at ``directory`` that a save killed mid-swap left behind, if any.

    Only a hard kill (power loss, SIGKILL) between the two renames of :meth:`DistilledSet.save`
    leaves one: ``.NAME.old-XXXX/set`` beside the missing ``NAME``. Returns its path or ``None``.
    """
    directory = Path(directory)
    if not directory.parent.is_dir():
        return None
    for candidate in sorted(directory.parent.glob(f".{directory.name}{RETIRED_MARK}*")):
        if (candidate / "set" / MANIFEST_FILE).is_file():
            return candidate / "set"
    return None


def load(directory: str | Path) -> DistilledSet:
    """Load a distilled set, refusing anything damaged, edited or of an unknown format version.

    Raises:
        DDKitError: one line saying what is wrong with the set and what to do.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    data_path = directory / DATA_FILE
    if not directory.exists() and (left := interrupted_save(directory)) is not None:
        raise DDKitError(
            f"{directory} is missing but a save of it was interrupted; its previous version is at "
            f"{left}, move that folder to {directory} to restore it"
        )
    if not directory.is_dir():
        raise DDKitError(f"{directory} is not a directory; pass the directory a distill/baseline command wrote")
    if not manifest_path.is_file() or not data_path.is_file():
        raise DDKitError(f"{directory} is not a distilled set (needs {MANIFEST_FILE} and {DATA_FILE})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DDKitError(f"{manifest_path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); the set is damaged") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DDKitError(f"{manifest_path} is not a ddkit manifest; the set is damaged or not a ddkit set")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DDKitError(
            f"{directory} has format version {version!r}; this ddkit reads version {FORMAT_VERSION} (upgrade ddkit or re-create the set)"
        )
    expected = (manifest.get("sha256") or {}).get(DATA_FILE)
    actual = sha256_of(data_path)
    if expected != actual:
        raise DDKitError(
            f"{data_path} does not match the sha256 in its manifest; the set is damaged or was edited, re-create or re-download it"
        )
    try:
        tensors = load_file(str(data_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DDKitError(f"{data_path} cannot be read as safetensors ({exc}); the set is damaged") from None
    for key in ("images", "labels"):
        if key not in tensors:
            raise DDKitError(f"{data_path} has no '{key}' tensor; the set is damaged")
    images = tensors["images"]
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    known = {
        "format", "format_version", "method", "dataset", "class_names", "num_classes", "image_shape",
        "num_images", "ipc", "decode", "normalization", "has_soft_labels", "sha256",
    }
    meta = {k: v for k, v in manifest.items() if k not in known}
    try:
        return DistilledSet(
            images=images.float(),
            labels=tensors["labels"],
            class_names=list(manifest["class_names"]),
            dataset=manifest["dataset"],
            mean=tuple(manifest["normalization"]["mean"]),
            std=tuple(manifest["normalization"]["std"]),
            method=manifest.get("method", "unknown"),
            decode=manifest.get("decode") or {"kind": "identity"},
            soft_labels=tensors.get("soft_labels"),
            extras={k: v for k, v in tensors.items() if k not in RESERVED_TENSORS},
            meta=meta,
            path=directory,
        )
    except KeyError as exc:
        raise DDKitError(f"{manifest_path} lacks the field {exc}; the set is damaged") from None
