"""Keep freed tensor memory for reuse instead of handing it back to the OS.

Streaming a merge allocates and frees the same few block-sized buffers thousands of times.
glibc's defaults return freed chunks above its thresholds to the kernel at once, so every
new buffer pays page faults on fresh memory: on a 2-core machine that tripled the time to
load the 836M-parameter benchmark's inputs (8.0 s against 3.0 s once tuned). Raising the
mmap and trim thresholds keeps up to ``TRIM`` bytes of freed memory in the heap; tensors
above ``MMAP`` (whole large matrices) are still mapped and unmapped as before, so the peak
resident memory grows by at most ``TRIM``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

MMAP = 32 << 20
TRIM = 128 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_done = False


def tune_allocator() -> bool:
    """Apply the thresholds once per process (glibc on Linux; elsewhere nothing). Returns
    whether they are in effect."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM))
    return _done
