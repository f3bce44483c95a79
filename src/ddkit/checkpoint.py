"""Atomic, multi-process checkpoints of a running distillation (no pickle anywhere).

Two layouts share ``OUT/checkpoint/latest.json`` (the run record ``ddkit distill --resume`` reads):
iteration checkpoints for the matching family, whose processes step together, below; and
:class:`BatchCheckpoints` for the recover step, whose batches are independent.

Iteration checkpoints, under a run's output directory::

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
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ddkit.errors import DDKitError
from ddkit.utils import atomic_write, wrapped_os_error, write_json_atomic

LATEST = "latest.json"


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor], state: dict | None = None) -> None:
    """Write ``tensors`` (and a JSON ``state`` in the file's metadata) to ``path`` through a
    temporary name and a rename, so the file is whole or absent."""
    metadata = None if state is None else {"state": json.dumps(state)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as exc:  # an I/O error inside safetensors: raised as the OSError it wraps
            raise (wrapped_os_error(exc) or exc) from None

    atomic_write(path, write)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a file from :func:`save_tensors_atomic` (state ``{}`` if it has none).

    Raises OSError, SafetensorError, ValueError or KeyError on a missing or damaged file."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        return tensors, _state_of(handle)


def _state_of(handle) -> dict:
    """The JSON state in an open safetensors file's metadata ({} if it has none)."""
    return json.loads((handle.metadata() or {}).get("state", "{}"))


def read_state(path: str | Path) -> dict:
    """The state of a file from :func:`save_tensors_atomic` without loading its tensors ({} if it
    has none). Raises like :func:`load_tensors`."""
    with safe_open(str(path), framework="pt") as handle:
        return _state_of(handle)


def _folder(root: Path, iteration: int) -> Path:
    return root / f"it-{iteration:08d}"


def write_part(root: str | Path, iteration: int, rank: int, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Write rank ``rank``'s part of the checkpoint taken before ``iteration`` (atomically)."""
    folder = _folder(Path(root), iteration)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(folder / f"rank{rank}.safetensors", tensors)
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


def _is_int(value, low: int, high: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)


#: what a run record must hold for ``--resume`` to start the same run: field -> (rule, check)
_RUN_FIELDS = {
    "method": ("a method name", lambda v: isinstance(v, str) and bool(v)),
    "dataset": ("a dataset name", lambda v: isinstance(v, str) and bool(v)),
    "ipc": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "preset": ("a preset name", lambda v: isinstance(v, str) and bool(v)),
    "seed": ("an integer from 0 to 2**63 - 1", lambda v: _is_int(v, 0, 2 ** 63 - 1)),
    "overrides": ("a list of key=value strings or a dict", lambda v: isinstance(v, (list, dict))),
    "image_size": ("null or an integer >= 1", lambda v: v is None or _is_int(v, 1)),
    "flags": ("a dict", lambda v: isinstance(v, dict)),
}


def _latest(root: Path) -> dict:
    """The checked commit marker of ``root``: one-line DDKitError for a missing, unreadable or
    edited one (a field of the wrong kind, a folder outside ``root``)."""
    marker = root / LATEST
    if not marker.is_file():
        raise DDKitError(f"no checkpoint in {root} (no {LATEST}); start the run without --resume")
    try:
        latest = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        latest = None
    problem = "it is not a JSON object" if not isinstance(latest, dict) else None
    if problem is None and not isinstance(latest.get("run"), dict):
        problem = "it has no run record"
    if problem is None:
        for name, (rule, valid) in _RUN_FIELDS.items():
            if name == "image_size" and name not in latest["run"]:
                continue
            if not valid(latest["run"].get(name)):
                problem = f"its run's {name} is {latest['run'].get(name)!r}, not {rule}"
                break
    if problem is None and latest.get("kind") != "batches":
        if not _is_int(latest.get("iteration"), 0):
            problem = f"its iteration is {latest.get('iteration')!r}, not an integer >= 0"
        elif not _is_int(latest.get("world_size"), 1):
            problem = f"its world_size is {latest.get('world_size')!r}, not an integer >= 1"
        elif latest.get("folder") != _folder(root, latest["iteration"]).name:
            problem = f"its folder is {latest.get('folder')!r}, not {_folder(root, latest['iteration']).name}"
    if problem is not None:
        raise DDKitError(f"the checkpoint {marker} is damaged or was edited ({problem}); delete {root} and start "
                         f"the run again")
    return latest


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


# ---- per-batch checkpoints (the recover family) ------------------------------------------------------
class BatchCheckpoints:
    """Checkpoints of work that comes in independent batches (the recover step), keyed by batch.

    Layout under ``root`` (``OUT/checkpoint``)::

        latest.json                    {"kind": "batches", "run": ...}: marks an unfinished run
        done/batch-000012.safetensors  a finished batch: its pixels and rows, its loss log (metadata)
        running/batch-000013.safetensors   a batch in progress: optimiser state, RNG, ... (metadata:
                                       the next iteration and the log so far)

    Every file is one ``safetensors`` file renamed into place, so each is whole or absent. Files are
    keyed by batch, not by process, and each batch is recovered by one process at a time, so the
    processes never wait for each other to checkpoint and a resumed run may use another process
    count: a process takes over any batch from the files its predecessor left.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def mark(self, run: dict) -> None:
        """Record how the run started (``ddkit distill --resume`` reads it); call once, on rank 0."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.root / LATEST, {"kind": "batches", "run": run})

    def _path(self, kind: str, batch: int) -> Path:
        return self.root / kind / f"batch-{int(batch):06d}.safetensors"

    def _write(self, kind: str, batch: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        path = self._path(kind, batch)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(path, tensors, meta)

    def _read(self, kind: str, batch: int) -> tuple[dict[str, torch.Tensor], dict] | None:
        path = self._path(kind, batch)
        if not path.is_file():
            return None
        try:
            return load_tensors(path)
        except (OSError, SafetensorError, ValueError, KeyError) as exc:
            raise DDKitError(f"checkpoint file {path} is damaged ({exc}); delete it to redo that batch") from None

    def save_running(self, batch: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Store the state of ``batch`` in progress (replacing the previous one)."""
        self._write("running", batch, tensors, meta)

    def save_done(self, batch: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Store the finished ``batch`` and drop its in-progress state."""
        self._write("done", batch, tensors, meta)
        self._path("running", batch).unlink(missing_ok=True)

    def done(self, batch: int) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, meta) of the finished ``batch``, or None."""
        return self._read("done", batch)

    def running(self, batch: int) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors, meta) of ``batch`` in progress, or None."""
        return self._read("running", batch)
