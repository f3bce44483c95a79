"""Relabel records in shards: one file per block of epochs, read lazily by the student.

FKD-style records are ``[E, N, K]`` fp16 logits: for ImageNet-1K at IPC 50 and 300 epochs about
30 GB, which neither fits one tensor in memory nor one safetensors file comfortably. With
``shard_epochs = S`` :func:`ddkit.methods.relabel.relabel` writes the logits (or top-k values and
indices) of epochs ``[a, a + S)`` to ``relabel-records/epochs-<a>-<b>.safetensors`` inside the set's
folder; the crop, flip and mix plan stays in the set's data file as before. The set's manifest
lists every shard with its epochs, byte count and sha256 (``meta["relabel"]["shards"]``), so the
manifest's seal covers them, and a shard is checked against its hash when it is first read.

:class:`ShardedRecords` stands in for the ``[E, N, K]`` tensor: ``records[epoch, rows]`` reads
one epoch of one shard (memory-mapped) and keeps just that epoch, so a student holds O(N K) of
records, not O(E N K).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ddkit.errors import DDKitError
from ddkit.store.distilled import SHARD_FOLDER  # noqa: F401 (the folder inside a set that holds the shards)
from ddkit.utils import sha256_of


def write_shard(folder: Path, start: int, stop: int, tensors: dict[str, torch.Tensor]) -> dict:
    """Write the records of epochs ``[start, stop)`` (each tensor ``[stop - start, N, k]``) to
    ``folder`` and return its manifest entry ``{file, epochs, bytes, sha256}``."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"epochs-{start:05d}-{stop - 1:05d}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
    path = folder / name
    return {"file": name, "epochs": [int(start), int(stop)], "bytes": path.stat().st_size, "sha256": sha256_of(path)}


class ShardedRecords:
    """One kind of record (``"logits"``, ``"topk_values"`` or ``"topk_indices"``) across shards.

    ``records[epoch, rows]`` -> the ``[len(rows), k]`` records of record epoch ``epoch``; ``shape``
    is ``(E, N, k)``; ``device`` is the CPU. Raises a one-line DDKitError when a shard is missing
    or its bytes differ from the hash the manifest recorded.
    """

    device = torch.device("cpu")

    def __init__(self, folder: Path, shards: list[dict], key: str):
        self.folder, self.shards, self.key = Path(folder), list(shards), key
        self._checked: set[str] = set()
        self._epoch: int | None = None
        self._rows: torch.Tensor | None = None
        first = self._open(self.shards[0])
        self.shape = (int(self.shards[-1]["epochs"][1]), *first.get_slice(key).get_shape()[1:])

    def _open(self, shard: dict):
        path = self.folder / shard["file"]
        if not path.is_file():
            raise DDKitError(f"relabel shard {path} is missing; the set is incomplete, relabel it again")
        if shard["file"] not in self._checked:
            if sha256_of(path) != shard["sha256"]:
                raise DDKitError(f"relabel shard {path} differs from the hash in the set's manifest; the set is "
                                 f"damaged, relabel it again")
            self._checked.add(shard["file"])
        return safe_open(str(path), framework="pt")

    def epoch(self, epoch: int) -> torch.Tensor:
        """All ``[N, k]`` records of record epoch ``epoch`` (kept until another epoch is read)."""
        if self._epoch != epoch:
            shard = next((s for s in self.shards if s["epochs"][0] <= epoch < s["epochs"][1]), None)
            if shard is None:
                raise DDKitError(f"no relabel shard holds epoch {epoch}; the set is damaged, relabel it again")
            offset = epoch - shard["epochs"][0]
            self._rows = self._open(shard).get_slice(self.key)[offset:offset + 1][0]
            self._epoch = epoch
        return self._rows

    def __getitem__(self, index):
        epoch, rows = index
        return self.epoch(int(epoch))[torch.as_tensor(rows).cpu()]


def sharded_sources(distilled) -> dict[str, ShardedRecords]:
    """``{"logits": ...}`` or ``{"topk_values": ..., "topk_indices": ...}`` of a set whose relabel
    records are sharded (empty for a set without shards). The set must have been loaded from disk."""
    shards = (distilled.meta.get("relabel") or {}).get("shards")
    if not shards:
        return {}
    folder = getattr(distilled, "attachments", {}).get(SHARD_FOLDER)  # relabelled, not saved yet
    if folder is None:
        if distilled.path is None:
            raise DDKitError("this set's relabel records are sharded beside a saved set; save it and load it again")
        folder = Path(distilled.path) / SHARD_FOLDER
    keys = ("topk_values", "topk_indices") if (distilled.meta["relabel"].get("topk")) else ("logits",)
    return {key: ShardedRecords(folder, shards, key) for key in keys}
