"""Keep freed memory in the process instead of handing it back to the operating system.

A training step on the CPU allocates and frees the same few large buffers (a batch of views is
10 MB at 128 x 5 x 64 x 64 float32) again and again. glibc's malloc serves blocks that large
with ``mmap`` and returns them with ``munmap`` (or trims them off the heap) when freed, so every
step faults the same memory in again, page by page, and the kernel zeroes each page: on the
2-core test machine that was ~18 % of the data path's time (views of a 64-pair batch 68 -> 56 ms
per step) and ~5 % of a 1-thread model step. PyTorch's CPU performance guide recommends another
allocator (jemalloc, TCMalloc) for the same reason; glibc can be told the same with
``mallopt(3)``: serve blocks up to 32 MiB from the heap (``M_MMAP_THRESHOLD``; 32 MiB is
glibc's largest allowed value on 64-bit systems, ``DEFAULT_MMAP_THRESHOLD_MAX``) and keep up to
1 GiB of free memory at the heap's top (``M_TRIM_THRESHOLD``). The cost: the process keeps its
peak heap after a big step instead of shrinking. Values and limits: the glibc manual, "Malloc
Tunable Parameters", and ``mallopt(3)``.

Applied by the ``sim2obs`` command (its own process) and in pretraining's DataLoader workers;
``SIM2OBS_RETAIN_FREED_MEMORY=0`` turns it off. Does nothing where the C library is not glibc
(macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

#: mallopt parameter numbers, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: the largest M_MMAP_THRESHOLD glibc accepts on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX,
#: 4 * 1024 * 1024 * sizeof(long)): blocks up to this size come from the heap
MMAP_THRESHOLD_BYTES = 32 << 20
#: free memory kept at the heap's top before glibc returns it to the system
TRIM_THRESHOLD_BYTES = 1 << 30

_applied = False


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed large blocks instead of returning them to the system
    (see the module's docstring). Returns whether the settings are in effect in this process:
    False off glibc, when ``SIM2OBS_RETAIN_FREED_MEMORY=0``, or if glibc refused them. Calling it
    again is harmless; forked processes (DataLoader workers) inherit the settings."""
    global _applied
    if _applied:
        return True
    if os.environ.get("SIM2OBS_RETAIN_FREED_MEMORY", "1").strip().lower() in {"0", "false", "no", "off"}:
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _applied
