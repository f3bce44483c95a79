"""The on-disk cache of a decoded dataset: one ``cache.safetensors`` file per dataset directory.

Layout of ``<dir>/cache.safetensors`` (uncompressed, so loading is a memory copy):

* tensors ``train_images`` / ``test_images``: ``uint8 [N, C, H, W]``;
  ``train_labels`` / ``test_labels``: ``int64 [N]``;
* string metadata ``ddkit_cache`` (format version), ``name``, ``class_names`` (JSON list),
  ``sha256`` (JSON dict: array name -> hex digest, see :func:`array_sha256`), ``source``
  (where the data came from; informative only).

Writes go to a temporary file in the same directory and are moved into place with
:func:`os.replace`, so a reader never sees a half-written cache.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ddkit.data.core import Split, one_line
from ddkit.errors import DDKitError
from ddkit.utils import atomic_write

CACHE_FILE = "cache.safetensors"
CACHE_FORMAT = "1"
ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def array_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 hex digest of an array's bytes as the official files store them.

    Images (``uint8``) are hashed as their C-contiguous bytes; labels are hashed as ``uint8``
    (one byte per label, as in IDX files), so a label tensor must hold values 0..255.
    """
    if tensor.dtype != torch.uint8:
        if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) > 255):
            raise ValueError("array_sha256 hashes labels as bytes; values must be 0..255")
        tensor = tensor.to(torch.uint8)
    return hashlib.sha256(tensor.contiguous().numpy().data).hexdigest()


def split_hashes(train: Split, test: Split) -> dict[str, str]:
    """The four :func:`array_sha256` digests, keyed like the cache's tensors."""
    return {
        "train_images": array_sha256(train.images),
        "train_labels": array_sha256(train.labels),
        "test_images": array_sha256(test.images),
        "test_labels": array_sha256(test.labels),
    }


def save_cache(
    directory: Path,
    name: str,
    train: Split,
    test: Split,
    class_names: list[str],
    source: str,
    hashes: dict[str, str] | None = None,
) -> Path:
    """Write ``directory/cache.safetensors`` atomically and return its path.

    ``hashes`` are the :func:`split_hashes` digests when already computed (they are computed
    here otherwise).
    """
    hashes = hashes or split_hashes(train, test)
    tensors = {
        "train_images": train.images.contiguous(),
        "train_labels": train.labels.contiguous(),
        "test_images": test.images.contiguous(),
        "test_labels": test.labels.contiguous(),
    }
    meta = {
        "ddkit_cache": CACHE_FORMAT,
        "name": name,
        "class_names": json.dumps(list(class_names)),
        "sha256": json.dumps(hashes, sort_keys=True),
        "source": source,
    }
    path = Path(directory) / CACHE_FILE
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    except OSError as exc:
        raise DDKitError(
            f"cannot write the cache {path} ({one_line(exc.strerror or exc)}); check that the "
            f"directory is writable and has space, or set DDKIT_DATA to another directory"
        ) from None
    return path


def _damaged(path: Path, name: str, why: str) -> DDKitError:
    return DDKitError(
        f"the ddkit cache {path} is damaged ({why}); delete {path.parent} and run "
        f"`ddkit data fetch {name}` again"
    )


def read_cache_meta(path: Path, name: str) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Read only the header of a cache file: ``(metadata, {tensor name: shape})``.

    Raises :class:`DDKitError` when the header is unreadable, from another format version or
    another dataset, or lacks one of the four tensors.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(path, name, one_line(exc)) from None
    if meta.get("ddkit_cache") != CACHE_FORMAT:
        raise DDKitError(
            f"the ddkit cache {path} has format {meta.get('ddkit_cache')!r}, this ddkit reads "
            f"format {CACHE_FORMAT!r}; delete {path.parent} and run `ddkit data fetch {name}` again"
        )
    if meta.get("name") != name:
        raise _damaged(path, name, f"it holds dataset {meta.get('name')!r}, not {name!r}")
    missing = [a for a in ARRAYS if a not in shapes]
    if missing:
        raise _damaged(path, name, f"missing {', '.join(missing)}")
    return meta, shapes


def load_cache(path: Path, name: str) -> tuple[Split, Split, list[str], dict[str, str]]:
    """Load a cache file: ``(train, test, class_names, metadata)``.

    Checks the format version, the dataset name, dtypes and shapes; does not re-hash the data
    (that is :func:`verify_cache`'s job, done by ``fetch_dataset``).
    """
    meta, _ = read_cache_meta(path, name)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            for key in ARRAYS:
                tensors[key] = f.get_tensor(key)
        class_names = json.loads(meta["class_names"])
        train = Split(tensors["train_images"], tensors["train_labels"])
        test = Split(tensors["test_images"], tensors["test_labels"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise _damaged(path, name, one_line(exc)) from None
    k = len(class_names)
    for split in (train, test):
        if len(split) and (int(split.labels.min()) < 0 or int(split.labels.max()) >= k):
            raise _damaged(path, name, f"labels outside 0..{k - 1}")
    return train, test, class_names, meta


def verify_cache(path: Path, name: str, expected: dict[str, str] | None = None) -> bool:
    """True when the cache at ``path`` loads and its arrays hash to the recorded digests.

    With ``expected`` given, the recorded digests must also equal those (the known digests of
    the official release). Never raises for a damaged cache; returns False instead.
    """
    if not path.is_file():
        return False
    try:
        train, test, _, meta = load_cache(path, name)
        recorded = json.loads(meta.get("sha256", "{}"))
    except (DDKitError, ValueError):
        return False
    if expected is not None and recorded != expected:
        return False
    return split_hashes(train, test) == recorded
