"""Atomic, multi-process checkpoints of a running distillation (no pickle anywhere).

Layout under a run's output directory::

    checkpoint/
      latest.json            the commit marker: iteration, world size, folder, how the run started
      it-00000120/
        rank0.safetensors    tensors of rank 0's part (its classes' images, optimiser state, RNG, ...)
        rank0.json           the part's small JSON state (log, counters)
        rank1.safetensors ...

Every rank writes its part through a temporary name and ``os.replace``; after a barrier rank 0
writes ``latest.json`` the same way and only then removes older folders. A crash at any moment
therefore leaves the previous committed checkpoint intact, and a half-written folder is never
named by ``latest.json``. A resumed run may use a different number of processes: it reads every
part of the committed folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ddkit.errors import DDKitError
from ddkit.utils import write_json_atomic

LATEST = "latest.json"


def _folder(root: Path, iteration: int) -> Path:
    return root / f"it-{iteration:08d}"


def write_part(root: str | Path, iteration: int, rank: int, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Write rank ``rank``'s part of the checkpoint taken before ``iteration`` (atomically)."""
    folder = _folder(Path(root), iteration)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank{rank}.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, folder / f"rank{rank}.safetensors")
    write_json_atomic(folder / f"rank{rank}.json", state)


def commit(root: str | Path, iteration: int, world_size: int, run: dict) -> Path:
    """Mark the parts of ``iteration`` as the latest checkpoint (rank 0, after every part is written)
    and remove older checkpoint folders. Returns the marker's path."""
    root = Path(root)
    marker = root / LATEST
    write_json_atomic(marker, {"iteration": int(iteration), "world_size": int(world_size),
                               "folder": _folder(root, iteration).name, "run": run})
    for old in root.glob("it-*"):
        if old.name != _folder(root, iteration).name:
            shutil.rmtree(old, ignore_errors=True)
    return marker


def read_run(root: str | Path) -> dict:
    """The ``run`` record (method, dataset, IPC, preset, seed, options) of the latest checkpoint."""
    return _latest(Path(root))["run"]


def _latest(root: Path) -> dict:
    marker = root / LATEST
    if not marker.is_file():
        raise DDKitError(f"no checkpoint in {root} (no {LATEST}); start the run without --resume")
    try:
        return json.loads(marker.read_text())
    except json.JSONDecodeError:
        raise DDKitError(f"{marker} is damaged; delete {root} and start again") from None


def load_latest(root: str | Path) -> tuple[int, list[tuple[dict[str, torch.Tensor], dict]]]:
    """The latest committed checkpoint: (iteration, [(tensors, state) for every part, rank order])."""
    root = Path(root)
    latest = _latest(root)
    folder = root / latest["folder"]
    parts = []
    for rank in range(int(latest["world_size"])):
        try:
            tensors = load_file(str(folder / f"rank{rank}.safetensors"))
            state = json.loads((folder / f"rank{rank}.json").read_text())
        except (OSError, SafetensorError, ValueError) as exc:
            raise DDKitError(f"checkpoint part {rank} in {folder} is missing or damaged ({exc}); "
                             f"delete {root} and start again") from None
        parts.append((tensors, state))
    return int(latest["iteration"]), parts


def generator_state(generator: torch.Generator) -> torch.Tensor:
    """The generator's state as a uint8 tensor (storable in safetensors)."""
    return generator.get_state().clone()


def restore_generator(generator: torch.Generator, state: torch.Tensor) -> None:
    """Set ``generator`` to a state from :func:`generator_state`."""
    generator.set_state(state.to(torch.uint8).cpu())
