"""Process groups for scale-out runs, and the fault hook the resilience tests use.

A run started by ``torchrun --nproc-per-node N -m ddkit distill ...`` (or ``ddkit distill --nproc
N``, which starts exactly that) sees ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in its environment.
:func:`setup` then joins the process group: backend ``nccl`` when the run's device is CUDA,
``gloo`` otherwise. One process per GPU: rank r uses ``cuda:LOCAL_RANK``.

Work is split so that the result does not depend on the number of processes: every rank draws the
same random stream as a single process would, and only the expensive part (forward and backward
passes of its own classes) is divided. See docs/scaling.md.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ddkit.utils import resolve_device


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` (a single process is 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part (torchrun with ``--nproc`` > 1)."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes files and shows progress."""
        return self.rank == 0

    def share(self, count: int) -> list[int]:
        """This rank's contiguous share of ``count`` items (e.g. class indices), as balanced as
        possible; the shares of all ranks partition ``range(count)`` in order."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return list(range(start, start + base + (1 if self.rank < extra else 0)))


_WORLD = World()


def current() -> World:
    """The world of this process (0 of 1 unless :func:`setup` joined a group)."""
    return _WORLD


def setup(device: torch.device | str | None = None) -> World:
    """Join the process group described by torchrun's environment variables (no-op without them).

    Returns:
        The :class:`World`; with CUDA the process is bound to ``cuda:LOCAL_RANK``.
    """
    global _WORLD
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        _WORLD = World()
        return _WORLD
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device is not None and torch.device(device).type == "cuda"
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    _WORLD = World(rank, size, local_rank)
    return _WORLD


def process_device(device: torch.device | str | None) -> torch.device:
    """``device`` for this process: under torchrun a CUDA device becomes ``cuda:LOCAL_RANK`` (one
    GPU per process); anything else is returned as it resolves."""
    resolved = resolve_device(device)
    if _WORLD.distributed and resolved.type == "cuda":
        return torch.device("cuda", _WORLD.local_rank)
    return resolved


#: at most this long for gloo's worker thread to let go of the last collective (it takes under a
#: millisecond on an idle machine)
_RELEASE_WAIT_SECONDS = 5.0


def teardown() -> None:
    """Leave the process group, after a last collective that every rank joins (:func:`_last_sync`)."""
    global _WORLD
    if _WORLD.distributed:
        if dist.is_initialized():
            _last_sync()
            dist.destroy_process_group()
    _WORLD = World()


def _last_sync() -> None:
    """Wait for every rank before leaving the group. Under gloo: a one-value all-reduce, then a
    wait until gloo's worker thread has let go of it.

    Gloo's worker thread drops its reference to a collective a moment after the caller has seen it
    finish (measured: right after ``all_reduce`` returns, its tensor still has other owners about
    half the time). If the process has begun to exit by then, freeing the collective's tensors
    needs the GIL of an interpreter that is shutting down, and the process aborts after its work
    is done ("terminate called without an active exception", exit -6: about 1 in 35 two-process
    runs on a loaded machine). ``dist.barrier()`` is worse: it also keeps the collectives that
    were running when it started (DistributedDataParallel's last all-reduces, which hold a
    Python object from the backward pass) and frees them on that thread when it is dropped.
    """
    if dist.get_backend() != "gloo":
        dist.barrier()
        return
    flag = torch.zeros(1)
    dist.all_reduce(flag)
    use_count = getattr(flag, "_use_count", None)
    if use_count is None:  # no way to ask: give the worker thread a moment
        time.sleep(0.05)
        return
    deadline = time.monotonic() + _RELEASE_WAIT_SECONDS
    while use_count() > 1 and time.monotonic() < deadline:
        time.sleep(0.001)


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if _WORLD.distributed:
        dist.barrier()


def all_reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum scalar ``values`` over ranks (same keys on every rank; unchanged for one process)."""
    if not _WORLD.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank."""
    if not _WORLD.distributed:
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.int64)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def maybe_inject_fault(iteration: int) -> None:
    """Fault injection for the resilience tests: with ``DDKIT_FAULT_AT_ITERATION=N`` (and
    optionally ``DDKIT_FAULT_RANK=r``) the process SIGKILLs itself when iteration N starts."""
    at = os.environ.get("DDKIT_FAULT_AT_ITERATION")
    if at is None or int(at) != iteration:
        return
    rank = os.environ.get("DDKIT_FAULT_RANK")
    if rank is not None and int(rank) != _WORLD.rank:
        return
    os.kill(os.getpid(), signal.SIGKILL)
