"""Give freed heap memory back to the system after a large transient allocation (Linux with glibc).

A batch function of the reference backend (a 64-token prefill) allocates on the order of 100 MB of
intermediate arrays that are all freed when the call returns. glibc keeps that memory in its heap: runs
of free pages between live blocks are not returned by themselves, and they would count in the process's
resident memory for the rest of its life (issue 18: RSS after load within 1.5x of the model's files;
measured 206-258 MB against 177 MB after a trim for a 128 MB model). Python's allocator has no hook for
this and no library offers one, hence this module.

The signal is the resident set itself (/proc/self/statm, a few microseconds to read): glibc's own count of
free bytes cannot tell released pages from resident ones, so it stays high after a trim and would ask for
one after every call. A trim runs when the resident set has grown by more than a threshold since the
last look that trimmed: after a prefill, not after each decode step (a KV cache filling up triggers one
now and then). Elsewhere (macOS, whose allocator returns large blocks itself; musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Any, Optional

# Growth of the resident set worth a trim (a decode step's transients are far smaller).
TRIM_ABOVE = 8 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _libc() -> Optional[Any]:
    if not os.path.exists("/proc/self/statm"):
        return None
    try:
        # glibc's soname first: ctypes.util (find_library) imports subprocess, a tenth of a load's imports
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        from ctypes.util import find_library

        name = find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
        except OSError:
            libc = None
    try:
        trim = libc.malloc_trim  # glibc only
    except AttributeError:
        return None
    trim.restype, trim.argtypes = ctypes.c_int, [ctypes.c_size_t]
    return libc


_LIBC = _libc()
_lock = threading.Lock()
_baseline = 0  # resident bytes after the last trim (or the first look)


def resident_bytes() -> int:
    """The process's resident set in bytes (0 where /proc is absent)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def trim_if_grown(threshold: int = TRIM_ABOVE) -> bool:
    """malloc_trim when the resident set grew by more than `threshold` bytes since the last trim;
    True if a trim ran."""
    global _baseline
    if _LIBC is None:
        return False
    rss = resident_bytes()
    with _lock:
        if _baseline and rss <= _baseline + threshold:
            return False
        if not _baseline:  # first look: nothing to compare with yet
            _baseline = rss
            return False
        _LIBC.malloc_trim(0)
        _baseline = resident_bytes()
        return True
