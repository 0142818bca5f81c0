"""Give the C heap's free pages back to the operating system (glibc's `malloc_trim`).

PyTorch's CPU tensors come from malloc. Each model call allocates and frees activations of
sizes that vary with the phrase, from several threads, and glibc keeps what is freed for
reuse: under a steady stream load the server's resident memory crept up by 100-150 MB over
20 minutes, and `malloc_trim(0)` gave back 250-550 MB of it, all free (BENCHMARKS.md, "Streams
coming and going"). The scheduler calls `release_free_heap` in the model thread every
`scheduler.heap_trim_interval_s`, between steps.

Elsewhere than glibc (musl, macOS) there is no `malloc_trim`, and this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def available() -> bool:
    """Whether this process's C library can give free heap pages back (glibc)."""
    return _malloc_trim() is not None


def release_free_heap() -> bool:
    """`malloc_trim(0)`: True if memory was given back, False if none was (or no glibc)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
