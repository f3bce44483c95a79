"""Lossless export of a set as one tensor file, and how an import recognises files ddkit wrote.

``ddkit export --format safetensors|npz|pt`` writes the images (float32 pixel space, values kept
outside [0, 1]) and labels of a set into one file, with a mark that says it was written by ddkit
and in which space the numbers are:

- ``.safetensors``: the header metadata ``{"format": "ddkit-export", "space": "pixel", ...}``;
- ``.npz``: an extra array ``ddkit`` holding that mark as a JSON string (read without pickle);
- ``.pt``: an extra entry ``ddkit`` holding that mark as a dict of strings (read with
  ``weights_only=True``).

A set's own ``data.safetensors`` carries ``{"format": "ddkit-distilled-set"}`` in its metadata.
:func:`declared_space` reads these marks (and the DM-script layout, which those scripts save in
normalised space), so that ``ddkit import --space auto`` never has to guess the space of a file
whose writer said what it holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ddkit._version import __version__

from ddkit.errors import DDKitError

#: the ``format`` of the mark ddkit's tensor-file export writes
EXPORT_FORMAT = "ddkit-export"
#: the name of the mark in ``.npz`` and ``.pt`` exports
MARK_KEY = "ddkit"
#: tensor-file formats of ``ddkit export`` (the file suffix)
TENSOR_FORMATS = ("safetensors", "npz", "pt")


def export_mark(dataset: str, method: str, class_names: list[str]) -> dict[str, str]:
    """The mark a tensor-file export carries: strings only (safetensors metadata holds strings)."""
    return {"format": EXPORT_FORMAT, "space": "pixel", "dataset": str(dataset), "method": str(method),
            "class_names": json.dumps([str(name) for name in class_names]), "ddkit": __version__}


def export_tensors(images: torch.Tensor, labels: torch.Tensor, mark: dict[str, str], path: str | Path) -> Path:
    """Write ``images`` float32 [N, C, H, W] (pixel space, not clipped) and ``labels`` int64 [N]
    losslessly into one file whose suffix (``.safetensors``, ``.npz``, ``.pt``) picks the format,
    with ``mark`` (:func:`export_mark`) so that ``ddkit import`` recognises it. Returns the path."""
    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in TENSOR_FORMATS:
        raise DDKitError(f"{path}: a tensor file needs the suffix .safetensors, .npz or .pt")
    if path.exists():
        raise DDKitError(f"{path} exists; choose another --to file")
    path.parent.mkdir(parents=True, exist_ok=True)
    images = images.detach().to(torch.float32).contiguous().cpu()
    labels = labels.detach().to(torch.int64).contiguous().cpu()
    if kind == "safetensors":
        save_file({"images": images, "labels": labels}, str(path), metadata=mark)
    elif kind == "npz":
        with open(path, "wb") as handle:
            np.savez(handle, images=images.numpy(), labels=labels.numpy(), **{MARK_KEY: np.array(json.dumps(mark))})
    else:
        torch.save({"images": images, "labels": labels, MARK_KEY: dict(mark)}, path)
    return path


def read_mark(obj, metadata: dict | None) -> dict | None:
    """The ddkit mark of a loaded file: safetensors ``metadata``, or the ``ddkit`` entry of an
    ``.npz``/``.pt`` dict ``obj``; None when the file carries none (or an unreadable one)."""
    if metadata and metadata.get("format") in (EXPORT_FORMAT, "ddkit-distilled-set"):
        return dict(metadata)
    if isinstance(obj, dict) and MARK_KEY in obj:
        mark = obj[MARK_KEY]
        if isinstance(mark, np.ndarray) and mark.dtype.kind == "U" and mark.ndim == 0:
            try:
                mark = json.loads(str(mark))
            except ValueError:
                return None
        if isinstance(mark, dict) and mark.get("format") == EXPORT_FORMAT:
            return mark
    return None


def declared_space(obj, metadata: dict | None, images) -> tuple[str, str] | None:
    """The space a file's writer declared, and why: ``(space, why)`` or None (then auto guesses).

    - a set's ``data.safetensors`` (metadata ``format: ddkit-distilled-set``): pixel space
      (``byte`` for uint8 images, which ddkit stores as 0..255);
    - a ``ddkit export`` tensor file: the ``space`` its mark names (pixel);
    - the DM-script layout ``{"data": [[images, labels], ...]}``: normalised, as the DM, DSA and IDM
      scripts save ``(pixel - mean) / std``.
    """
    mark = read_mark(obj, metadata)
    if mark is not None:
        if mark.get("format") == "ddkit-distilled-set":
            is_bytes = getattr(images, "dtype", None) in (torch.uint8, np.uint8)
            return ("byte" if is_bytes else "pixel"), "a ddkit set's data file (metadata format ddkit-distilled-set)"
        space = mark.get("space")
        if space not in ("pixel", "byte", "normalized"):
            return None
        return space, f"written by ddkit export (its mark says {space} space)"
    if isinstance(obj, dict) and isinstance(obj.get("data"), (list, tuple)):
        return "normalized", "the DM-script layout {'data': [[images, labels], ...]}, which those scripts save normalised"
    return None
