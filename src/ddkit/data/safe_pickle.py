"""A restricted unpickler for the official CIFAR python batches.

The CIFAR-10/100 "python version" is a set of pickles: dicts of lists, byte strings and numpy
``uint8`` arrays. A pickle can name any importable callable, so unpickling a stranger's file with
:mod:`pickle` would run whatever it asks for. :func:`safe_load` only resolves the few globals
that such batches need (plain builtin containers and numpy's array/dtype reconstructors) and
refuses everything else with a :class:`~ddkit.errors.DDKitError` *before* anything is called.
"""

from __future__ import annotations

import _codecs
import builtins
import io
import pickle

import numpy as np

from ddkit.data.core import one_line
from ddkit.errors import DDKitError

try:  # numpy >= 2 keeps the implementation in numpy._core
    from numpy import _core as _NUMPY_CORE  # type: ignore[attr-defined]
except ImportError:  # numpy 1.x
    from numpy import core as _NUMPY_CORE  # type: ignore[no-redef]


def _numpy_core():
    return _NUMPY_CORE


def _allowed() -> dict[tuple[str, str], object]:
    core = _numpy_core()
    table: dict[tuple[str, str], object] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "_reconstruct")] = core.multiarray._reconstruct
        table[(mod, "scalar")] = core.multiarray.scalar
    frombuffer = getattr(core.numeric, "_frombuffer", None)
    if frombuffer is not None:
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            table[(mod, "_frombuffer")] = frombuffer
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    for name in ("list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray", "str",
                 "int", "float", "complex", "bool"):
        table[("builtins", name)] = getattr(builtins, name)
        table[("__builtin__", name)] = getattr(builtins, name)
    # Python 3 writes bytes in protocol < 3 pickles as _codecs.encode(text, "latin1").
    table[("_codecs", "encode")] = _codecs.encode
    return table


_ALLOWED: dict[tuple[str, str], object] | None = None


class RefusedGlobal(Exception):
    """Raised inside the unpickler when the stream names a global outside the whitelist."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        global _ALLOWED
        if _ALLOWED is None:
            _ALLOWED = _allowed()
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid):  # pragma: no cover - CIFAR never uses persistent ids
        raise RefusedGlobal(f"persistent id {pid!r}")


def safe_load(data: bytes, source: str, redo: str):
    """Unpickle ``data`` allowing only builtin containers and numpy arrays.

    ``source`` names the file in messages, ``redo`` is the advice appended to them. Byte strings
    written by Python 2 come back as ``bytes`` (``encoding="bytes"``), as in the official recipe.
    Raises :class:`DDKitError` for a refused global or an unreadable stream.
    """
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except RefusedGlobal as exc:
        raise DDKitError(
            f"refusing to unpickle {source}: it asks for {exc}, which a CIFAR batch never "
            f"contains (only lists, byte strings and numpy arrays); the file is not the official "
            f"release and may be malicious, so delete it and use the official files"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError, UnicodeDecodeError) as exc:
        raise DDKitError(
            f"{source} is not a readable CIFAR batch (truncated or corrupt: "
            f"{type(exc).__name__}: {one_line(exc)}); {redo}"
        ) from None
