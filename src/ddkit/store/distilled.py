"""The distilled-set directory format.

A set is a directory holding

- ``data.safetensors``: ``images`` (float32 or uint8, pixel space [0, 1] / [0, 255]),
  ``labels`` (int64) and optionally ``soft_labels``. safetensors holds raw tensors only, so loading
  a set from a stranger never executes code (no pickle anywhere).
- ``manifest.json``: format version, method, dataset, class names, image shape, normalisation,
  IPC, how the stored images decode into training images, the resolved configuration, seeds,
  versions, timings, peak memory, the sha256 of ``data.safetensors`` and evaluation results.
- ``grid.png``: the stored images, one row per class.

The manifest is under the hash too (format version 2): ``sha256["manifest.json"]`` is the sha256
of the canonical JSON (:func:`ddkit.utils.canonical_json`) of every manifest field except
``evaluations`` and this digest itself; it covers the data file's sha256 as well. So an edit to
any field that decides what is trained or how (normalisation, decode, shapes, classes, IPC,
method, configuration, seeds, ...) is refused, while evaluation records may be appended.

Writes are atomic: a whole set is written into a sibling temporary directory and renamed into
place (a failed re-save rolls back; see :meth:`DistilledSet.save`); the manifest alone is
rewritten through a temporary file and ``os.replace``. One writer at a time: every write takes an
exclusive ``flock`` on ``.NAME.lock`` beside the set (:func:`set_lock`; a re-save renames the
set's folder, so a lock file inside it would not outlive the swap) and merges its evaluation
records into the manifest as it is on disk then, so concurrent evaluations keep every record.
Whole runs that write a set (a distillation, ``ddkit relabel``) also hold ``.NAME.run.lock``
(:func:`run_lock`), so a second run into the same folder is refused while the first goes on.

Loading checks the format version, the manifest's seal, the data hash, the tensors (finite,
non-empty images; integer labels in range) and the manifest's shape fields against them, and
refuses a damaged or edited set with one line. Sets of format version 1 (no seal) still load:
their data hash and shape fields are checked, and the next write to them (an evaluation
record, a re-save) seals the manifest as version 2.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddkit._version import __version__
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ddkit.augment.partition import decode_images
from ddkit.errors import DDKitError
from ddkit.store.grid import save_grid
from ddkit.utils import canonical_json, default_mode, lock_file, sha256_of, wrapped_os_error, write_json_atomic

FORMAT_NAME = "ddkit-distilled-set"
#: 2: the manifest is sealed (``sha256["manifest.json"]``); 1: sets written before that, still read
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
#: manifest fields outside the seal: records that evaluations append
UNSEALED_FIELDS = ("evaluations",)
DATA_FILE = "data.safetensors"
MANIFEST_FILE = "manifest.json"
#: the folder of a set that holds its sharded relabel records (ddkit.methods.shards)
SHARD_FOLDER = "relabel-records"
GRID_FILE = "grid.png"
RETIRED_MARK = ".old-"  # a save parks the previous set in a sibling ".NAME.old-XXXX/set"
#: tensor names of data.safetensors with a fixed meaning; everything else is an extra
RESERVED_TENSORS = ("images", "labels", "soft_labels")


#: How long a write waits for another process's write to the same set (a save, an evaluation
#: record; each takes well under a second but for huge sets) before it gives up with one line.
LOCK_WAIT_SECONDS = 300.0
#: Lock files an ancestor process holds for this one (``ddkit distill --nproc N`` holds the run lock
#: of its ``--out`` while torchrun's workers run), separated by ``os.pathsep``.
HELD_LOCKS_ENV = "DDKIT_HELD_LOCKS"
_held_locks: dict[str, int] = {}  # lock file -> the descriptor that holds it, in this process


def set_lock_path(directory: str | Path, kind: str = "") -> Path:
    """The lock file of the set at ``directory``: ``.NAME.lock`` (``.NAME.run.lock`` for
    ``kind="run"``) beside it, so that it outlives the renames of a re-save."""
    target = Path(directory).resolve()
    return target.parent / f".{target.name}{'.' + kind if kind else ''}.lock"


def _holder(path: Path) -> str:
    """Who holds the lock file ``path``, as the holder wrote it (for messages)."""
    try:
        note = json.loads(path.read_text() or "{}")
        return f"another ddkit process (pid {int(note['pid'])}, {note['purpose']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another ddkit process"


@contextlib.contextmanager
def _exclusive(path: Path, purpose: str, wait: bool, timeout: float, busy):
    """Hold an exclusive ``flock`` on ``path`` for the block; re-entrant within a process.

    The holder removes the file as it lets go (so no lock files are left behind), and a process
    that gets the lock counts it only if ``path`` still names the file it locked; otherwise it
    tries again. Where another process holds it: wait up to ``timeout`` seconds (``wait``) or at
    once raise ``DDKitError(busy(holder))``. A killed holder's lock ends with its process.
    """
    key = str(path)
    if key in _held_locks or key in os.environ.get(HELD_LOCKS_ENV, "").split(os.pathsep):
        yield
        return
    deadline = time.monotonic() + timeout
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = lock_file(path, wait=False)
        if fd is not None:
            try:
                now = os.stat(path)
                mine = os.fstat(fd)
                if (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)  # its holder removed it as it let go: lock the file now at ``path``
            continue
        if not wait or time.monotonic() > deadline:
            raise DDKitError(busy(_holder(path)))
        time.sleep(0.05)
    note = {"pid": os.getpid(), "purpose": purpose, "since": _dt.datetime.now(_dt.timezone.utc).isoformat()}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(note).encode())
    _held_locks[key] = fd
    try:
        yield
    finally:
        del _held_locks[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def set_lock(directory: str | Path, purpose: str, wait: bool = True, timeout: float | None = None):
    """Context manager: the exclusive write lock of the set at ``directory`` (held for a save or a
    manifest update, never for long work). Waits for another holder up to ``timeout`` seconds
    (default :data:`LOCK_WAIT_SECONDS`), or not at all without ``wait``; then DDKitError.

    A ``flock`` on ``.NAME.lock`` beside the set: on Linux it binds every process on the machine;
    on a network file system only where its locks reach every client.
    """
    timeout = LOCK_WAIT_SECONDS if timeout is None else float(timeout)
    return _exclusive(set_lock_path(directory), purpose, wait, timeout,
                      lambda holder: f"{holder} is writing {directory} and has not finished in {timeout:.0f} s; wait "
                                     f"for it to finish and try again")


def run_lock(directory: str | Path, purpose: str):
    """Context manager: the run lock of the set at ``directory``, held for a whole run that writes
    it (a distillation, a relabel); a second such run is refused at once with one line while the
    first goes on. Evaluations do not take it (they take :func:`set_lock` to store a record)."""
    return _exclusive(set_lock_path(directory, "run"), purpose, False, 0.0,
                      lambda holder: f"{holder} is writing {directory}; wait for it to finish or choose another --out")


def manifest_digest(manifest: dict) -> str:
    """sha256 (hex) of the canonical JSON of ``manifest`` without :data:`UNSEALED_FIELDS` and without
    its own ``sha256["manifest.json"]``: the seal of format version 2."""
    sealed = {key: value for key, value in manifest.items() if key not in UNSEALED_FIELDS}
    hashes = manifest.get("sha256")
    if isinstance(hashes, dict):
        sealed["sha256"] = {key: value for key, value in hashes.items() if key != MANIFEST_FILE}
    return hashlib.sha256(canonical_json(sealed).encode("ascii")).hexdigest()


def seal_manifest(manifest: dict) -> dict:
    """``manifest`` as format version :data:`FORMAT_VERSION`, with its seal
    (``sha256["manifest.json"]``, see :func:`manifest_digest`)."""
    sealed = dict(manifest, format_version=FORMAT_VERSION)
    sealed["sha256"] = {key: value for key, value in (manifest.get("sha256") or {}).items() if key != MANIFEST_FILE}
    sealed["sha256"][MANIFEST_FILE] = manifest_digest(sealed)
    return sealed


def runtime_versions() -> dict:
    """Library, torch and Python versions, recorded in every manifest."""
    return {
        "ddkit": __version__,
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
    #: sha256 of ``data.safetensors`` as loaded or saved: what the manifest records for it, checked
    #: once at load; manifest updates write this value and never read the data file again
    data_sha256: str | None = field(default=None, repr=False, compare=False)
    # canonical JSON of the evaluation records as last read from or written to disk: a record in
    # ``meta`` but not here is new in this process, one here but gone from disk was replaced by another
    _records_seen: set = field(default_factory=set, init=False, repr=False, compare=False)

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

    def check_contents(self, where: str | None = None) -> None:
        """Refuse, with one line, a set that training could only score as chance: no images, or NaN
        or infinite pixels, soft labels or soft-label records. ``where`` names the set in the
        message (default: its path). Called by :func:`load`, :meth:`save` and the evaluator."""
        where = where or (str(self.path) if self.path is not None else "the set")
        if self.images.shape[0] == 0 or self.images.numel() == 0:
            raise DDKitError(f"{where} holds no images (shape {list(self.images.shape)}); there is nothing to "
                             f"train on: distill or import it again")
        named = [("pixel values", self.images)]
        if self.soft_labels is not None:
            named.append(("soft labels", self.soft_labels))
        named += [(f"'{name}' values", tensor) for name, tensor in self.extras.items()]
        for what, tensor in named:
            if (tensor.is_floating_point() or tensor.is_complex()) and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise DDKitError(f"{where} holds NaN or infinite {what} ({bad} of {tensor.numel()}); a network "
                                 f"trained on them learns nothing: distill or import the set again")

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

        The save holds the set's write lock (:func:`set_lock`). Re-saving the set this object was
        loaded from keeps the evaluation records other processes stored since it was loaded.

        Raises:
            DDKitError: a set without images or with NaN or infinite values (nothing is written),
                or ``directory`` holds something that is not a set.

        Returns:
            The directory path.
        """
        directory = Path(directory)
        self.check_contents(where=f"the set to save in {directory}")
        # Renames work on the resolved path: with "runs/x/../x" or ".", the parent named in the
        # path would stop existing once the old set is moved aside.
        target = directory.resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        with set_lock(target, "save"):
            self._save_locked(directory, target, grid)
        self.path = directory
        return directory

    def _save_locked(self, directory: Path, target: Path, grid: bool) -> None:
        run_state = {"checkpoint", ".parts"}  # written into --out while a run is in progress
        if target.exists() and not (target / MANIFEST_FILE).exists() and any(
                item.name not in run_state for item in target.iterdir()):
            raise DDKitError(
                f"{directory} exists and is not a distilled set; choose another --out or remove it"
            )
        if self.path is not None and Path(self.path).resolve() == target:
            self.meta["evaluations"] = self._merged_records(_records_on_disk(target, self.data_sha256))
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        carried: list[str] = []  # names of the user's files moved from target into staging
        retired: Path | None = None
        try:
            tensors = {"images": self.images.detach().cpu().contiguous(), "labels": self.labels.cpu().contiguous()}
            if self.soft_labels is not None:
                tensors["soft_labels"] = self.soft_labels.detach().cpu().contiguous()
            for name, tensor in self.extras.items():
                tensors[name] = tensor.detach().cpu().contiguous()
            try:
                save_file(tensors, str(staging / DATA_FILE), metadata={"format": FORMAT_NAME})
            except SafetensorError as exc:  # an I/O error inside safetensors: raised as the OSError it wraps
                raise (wrapped_os_error(exc) or exc) from None
            os.chmod(staging / DATA_FILE, default_mode())
            os.chmod(staging, default_mode(directory=True))
            # files written beside the set before it had a folder (sharded relabel records, hashed in meta)
            for name, source in getattr(self, "attachments", {}).items():
                shutil.move(str(source), str(staging / name))
            shards = (self.meta.get("relabel") or {}).get("shards")
            if shards and self.path is not None and Path(self.path).resolve() != target:  # saved elsewhere: copy them
                if (Path(self.path) / SHARD_FOLDER).is_dir() and not (staging / SHARD_FOLDER).exists():
                    shutil.copytree(Path(self.path) / SHARD_FOLDER, staging / SHARD_FOLDER)
            digest = sha256_of(staging / DATA_FILE)
            manifest = self.manifest(sha256=digest)
            write_json_atomic(staging / MANIFEST_FILE, seal_manifest(manifest))
            if grid:
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
        self.attachments = {}  # now inside the set's folder
        # what the manifest now says, so later manifest updates write the same fields
        self.meta.setdefault("created", manifest["created"])
        self.meta.setdefault("versions", manifest["versions"])
        self.data_sha256 = digest
        self._records_seen = {canonical_json(record) for record in manifest["evaluations"]}

    def succeeds(self, origin: "DistilledSet") -> "DistilledSet":
        """Mark this set as the new version of ``origin`` (e.g. ``origin`` relabelled), to be saved in
        its folder: like a re-save of ``origin``, the save then keeps the evaluation records other
        processes stored there since ``origin`` was loaded. Returns ``self``."""
        self.path, self.data_sha256 = origin.path, origin.data_sha256
        self._records_seen = set(origin._records_seen)
        return self

    def _merged_records(self, on_disk: list[dict]) -> list[dict]:
        """The records on disk, then those of ``meta`` this process added since it last read or
        wrote them (records another process replaced meanwhile stay replaced)."""
        merged = list(on_disk)
        known = {canonical_json(record) for record in on_disk} | self._records_seen
        merged += [record for record in self.meta.get("evaluations", []) if canonical_json(record) not in known]
        return merged

    def update_manifest(self) -> None:
        """Rewrite only ``manifest.json`` (under the set's write lock) with the data hash the set was
        loaded or saved with (the data file is not read again) and the evaluation records on disk
        plus those this process added.

        Raises:
            DDKitError: the set is not saved, or its data file was replaced on disk since it was
                loaded (the manifest is left as it is).
        """
        self._write_manifest(lambda evaluations: evaluations)

    def _write_manifest(self, change) -> None:
        """Under the write lock: merge the records on disk with this process's
        (:meth:`_merged_records`), let ``change(records)`` return the list to store, write the
        manifest sealed."""
        if self.path is None:
            raise DDKitError("this set has not been saved yet; call save(directory) first")
        with set_lock(self.path, "manifest update"):
            on_disk = _records_on_disk(Path(self.path), self.data_sha256, strict=True)
            self.meta["evaluations"] = change(self._merged_records(on_disk))
            write_json_atomic(Path(self.path) / MANIFEST_FILE, seal_manifest(self.manifest(sha256=self.data_sha256)))
            self._records_seen = {canonical_json(record) for record in self.meta["evaluations"]}

    def record_evaluation(self, record: dict, replacing=()) -> None:
        """Store an evaluation record in the manifest metadata (and on disk when saved).

        ``replacing``: records already stored (equal as JSON) that ``record`` supersedes, e.g. the
        partial record of an evaluation whose runs are not all done yet; they are removed and
        ``record`` takes the place of the first, else it is appended. On disk this happens under the
        set's write lock, on the records as they are on disk then: records other processes stored
        meanwhile are kept (and adopted into ``meta``).

        Raises:
            DDKitError: the data file was replaced on disk since this set was loaded: the record,
                which describes the old data, is not stored.
        """
        superseded = {canonical_json(old) for old in replacing}

        def change(evaluations: list[dict]) -> list[dict]:
            positions = [i for i, old in enumerate(evaluations) if canonical_json(old) in superseded]
            kept = [old for i, old in enumerate(evaluations) if i not in positions]
            kept.insert(positions[0] if positions else len(kept), record)
            return kept

        if self.path is None:
            self.meta["evaluations"] = change(list(self.meta.get("evaluations", [])))
        else:
            self._write_manifest(change)


def _records_on_disk(target: Path, data_sha256: str | None, strict: bool = False) -> list[dict]:
    """The evaluation records of the manifest in ``target``, for a write that holds the lock.

    With ``strict`` (a manifest update), the manifest must describe the data this process loaded
    (``data_sha256``), else DDKitError; without it (a re-save), a missing, damaged or other set
    contributes no records.
    """
    manifest_path = target / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
        recorded = manifest["sha256"][DATA_FILE]
        records = manifest.get("evaluations") or []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if strict:
            raise DDKitError(f"{manifest_path} cannot be read ({exc}); the set is damaged or was removed while "
                             f"this process used it, so nothing was stored") from None
        return []
    if recorded != data_sha256 or not isinstance(records, list):
        if strict:
            raise DDKitError(f"{target} was replaced while this process used it (its data file changed since it "
                             f"was loaded), so this result was not stored in it: load the set again")
        return []
    return [record for record in records if isinstance(record, dict)]


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

    Checks, in order: the manifest's format and version; its seal (version 2: every field but the
    evaluations, see :func:`manifest_digest`); the sha256 of the data file; the tensors (images
    float32 or uint8 ``[N, C, H, W]`` with N >= 1 and finite values; labels integer class indices;
    finite soft labels and records); the manifest's shape fields (images, shape, classes, IPC,
    soft labels) and normalisation against the tensors.

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
    if version not in READABLE_VERSIONS:
        raise DDKitError(
            f"{directory} has format version {version!r}; this ddkit reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade ddkit or re-create the set)"
        )
    hashes = manifest.get("sha256")
    if not isinstance(hashes, dict):
        raise DDKitError(f"{manifest_path} has no sha256 record; the set is damaged, re-create or re-download it")
    if version >= 2 and hashes.get(MANIFEST_FILE) != manifest_digest(manifest):
        raise DDKitError(
            f"{manifest_path} was edited after the set was saved (its fields do not match their sha256); what "
            f"the set trains with may have changed, so it is refused: restore the manifest or re-create the set"
        )
    expected = hashes.get(DATA_FILE)
    actual = sha256_of(data_path)
    if expected != actual:
        raise DDKitError(
            f"{data_path} does not match the sha256 in its manifest; the set is damaged or was edited, re-create or re-download it"
        )
    try:
        tensors = load_file(str(data_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DDKitError(f"{data_path} cannot be read as safetensors ({exc}); the set is damaged") from None
    distilled = _from_tensors(tensors, manifest, directory)
    distilled.data_sha256 = expected
    distilled._records_seen = {canonical_json(record) for record in distilled.meta.get("evaluations") or []}
    _check_fields(distilled, manifest, manifest_path)
    return distilled


#: manifest fields :func:`load` reads into the set's attributes (the rest go to ``meta``)
_KNOWN_FIELDS = ("format", "format_version", "method", "dataset", "class_names", "num_classes", "image_shape",
                 "num_images", "ipc", "decode", "normalization", "has_soft_labels", "sha256")


def _from_tensors(tensors: dict, manifest: dict, directory: Path) -> DistilledSet:
    """The set made of a data file's ``tensors`` and its manifest, refusing tensors of the wrong kind."""
    data_path, manifest_path = directory / DATA_FILE, directory / MANIFEST_FILE
    for key in ("images", "labels"):
        if key not in tensors:
            raise DDKitError(f"{data_path} has no '{key}' tensor; the set is damaged")
    images, labels = tensors["images"], tensors["labels"]
    if images.dtype not in (torch.float32, torch.uint8) or images.dim() != 4:
        raise DDKitError(f"{data_path}: the images are {images.dtype} of shape {list(images.shape)}; the format "
                         f"stores float32 or uint8 [N, C, H, W]: the set is damaged, re-create it")
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DDKitError(f"{data_path}: the labels are {labels.dtype} of shape {list(labels.shape)}, not class "
                         f"indices (an integer tensor [N]); the set is damaged, re-create it")
    soft = tensors.get("soft_labels")
    if soft is not None and (not soft.is_floating_point() or soft.dim() != 2 or soft.shape[0] != images.shape[0]):
        raise DDKitError(f"{data_path}: the soft labels are {soft.dtype} of shape {list(soft.shape)}, not float "
                         f"[{images.shape[0]}, classes]; the set is damaged, re-create it")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    try:
        normalization = manifest["normalization"]
        distilled = DistilledSet(
            images=images,
            labels=labels,
            class_names=list(manifest["class_names"]),
            dataset=manifest["dataset"],
            mean=tuple(normalization["mean"]),
            std=tuple(normalization["std"]),
            method=manifest.get("method", "unknown"),
            decode=manifest.get("decode") or {"kind": "identity"},
            soft_labels=soft,
            extras={k: v for k, v in tensors.items() if k not in RESERVED_TENSORS},
            meta={k: v for k, v in manifest.items() if k not in _KNOWN_FIELDS},
            path=directory,
        )
    except KeyError as exc:
        raise DDKitError(f"{manifest_path} lacks the field {exc}; the set is damaged") from None
    except (TypeError, ValueError) as exc:
        raise DDKitError(f"{manifest_path} has a field of the wrong kind ({exc}); the set is damaged") from None
    except DDKitError as exc:
        raise DDKitError(f"{directory}: {exc}; the set is damaged, re-create it") from None
    distilled.check_contents(where=str(directory))
    return distilled


def _check_fields(distilled: DistilledSet, manifest: dict, manifest_path: Path) -> None:
    """Refuse a manifest whose shape fields or normalisation contradict the tensors (for sets of
    format version 1, whose manifest has no seal, this is the only check of those fields)."""
    written = distilled.manifest()
    for key in ("num_images", "image_shape", "num_classes", "ipc", "has_soft_labels"):
        if key in manifest and manifest[key] != written[key]:
            raise DDKitError(f"{manifest_path} says {key} is {manifest[key]!r} but the data holds {written[key]!r}; "
                             f"the set is damaged or was edited, re-create it")
    channels = distilled.image_shape[0]
    if len(distilled.mean) != channels or len(distilled.std) != channels or not all(
            math.isfinite(v) for v in distilled.mean + distilled.std) or not all(v > 0 for v in distilled.std):
        raise DDKitError(f"{manifest_path}: the normalisation (mean {list(distilled.mean)}, std {list(distilled.std)}) "
                         f"is not {channels} finite means and positive stds; the set is damaged or was edited")
    try:
        decode_images(distilled.images[:1], distilled.labels[:1], distilled.decode)
    except (DDKitError, KeyError, TypeError, ValueError) as exc:
        raise DDKitError(f"{manifest_path}: its decode record {distilled.decode!r} does not apply to these images "
                         f"({exc}); the set is damaged or was edited") from None
