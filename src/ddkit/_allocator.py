"""Keep freed CPU memory in the process, so that the next step's tensors need no fresh pages.

Every matching step, recover step and training batch allocates the same large CPU tensors again
(the 128-channel maps of a whole batch: 67 MB for 128 images of 32 x 32 in a width-128 ConvNet,
262 MB for 500). glibc's malloc serves requests above its mmap threshold (at most 32 MB) with a
fresh ``mmap`` and returns them with ``munmap`` when freed, so every step the kernel maps and zeroes
those pages again: in a profile of the DM synthetic side at IPC 50, ReLU's backward, a pass that
takes 35 ms on memory it has touched before, took 190 ms per call. With mmap off and no trimming,
freed blocks stay in malloc's heap and are reused: one DM step at 64 real images per class ran in
0.68 s instead of 0.85 s, and the synthetic side's forward and backward at IPC 50 in 1.04 s instead
of 1.75 s (docs/speed.md). The price: the process keeps its peak heap until it exits (the peak
itself is unchanged).

``import ddkit`` calls :func:`keep_freed_memory` unless ``DDKIT_KEEP_FREED_MEMORY=0`` is in the
environment. It does nothing off glibc (macOS, musl), where malloc behaves differently.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: Environment variable that turns :func:`keep_freed_memory` off at import when set to 0.
ENVIRONMENT_VARIABLE = "DDKIT_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse: no ``mmap`` for large blocks
    (``M_MMAP_MAX=0``) and no returning the heap's top to the system (``M_TRIM_THRESHOLD`` at its
    largest value).

    Returns:
        True when both settings were applied; False off Linux/glibc or when mallopt refused.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def keep_freed_memory_unless_told_not_to() -> bool:
    """:func:`keep_freed_memory`, unless the environment sets ``DDKIT_KEEP_FREED_MEMORY=0``."""
    if os.environ.get(ENVIRONMENT_VARIABLE, "1").strip() == "0":
        return False
    return keep_freed_memory()
