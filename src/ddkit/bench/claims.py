"""Claims: several bench processes may work on one bench directory at once (on one machine, or on a
file system whose ``flock`` locks reach every machine). Each claims a cell before it runs it
(:func:`claim_cell`) and passes over cells another running process holds. A claim is an exclusive
``flock`` on the cell's lock file under ``.claims/``: it ends with its process, crash included, so
nothing stale is left to clean up."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ddkit.bench.cells import Cell
from ddkit.bench.results import utc_now
from ddkit.utils import lock_file


CLAIMS_DIR = ".claims"


class CellClaim:
    """This process's hold on one cell of a bench directory (see the module docstring).

    Attributes:
        held: True when this process holds the cell; False when another running process does.
        holder: the holding process's ``{"pid", "host", "since"}`` where ``held`` is False (as it
            wrote it; empty if unreadable).
    """

    def __init__(self, out: Path, cell: Cell):
        folder = Path(out) / CLAIMS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{cell.name}.lock"  # never deleted (see lock_file)
        self._fd = lock_file(path, wait=False)
        self.held = self._fd is not None
        self.holder: dict = {}
        if not self.held:
            try:
                self.holder = json.loads(path.read_text(encoding="utf-8") or "{}")
            except (OSError, ValueError, UnicodeDecodeError):
                pass
            return
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                        "since": utc_now()}).encode("utf-8"), 0)

    def release(self) -> None:
        """End the claim (closing the file drops the lock); safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "CellClaim":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def describe(self) -> str:
        """``"pid 123 on host, since ..."`` of the process holding the cell."""
        holder = self.holder
        return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
                if holder else "another process")


def claim_cell(out: str | Path, cell: Cell) -> CellClaim:
    """Try to claim ``cell`` of the bench directory ``out`` for this process, without waiting.

    Returns a :class:`CellClaim`; its ``held`` says whether the claim succeeded. Use it as a context
    manager (or call ``release``) to end the claim; a process that ends drops its claims anyway.
    """
    return CellClaim(Path(out), cell)


def cell_held_elsewhere(out: str | Path, cell: Cell) -> CellClaim | None:
    """The claim of another running process on ``cell`` (for ``--plan``), or None if none holds it."""
    if not (Path(out) / CLAIMS_DIR / f"{cell.name}.lock").exists():
        return None
    try:
        with claim_cell(out, cell) as claim:
            return None if claim.held else claim
    except OSError:  # a bench directory this user may read but not write: nobody's claim can be seen
        return None
