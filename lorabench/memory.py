"""``hardware.release_memory``: glibc returns freed buffers to the system at once.

By default glibc keeps freed heap memory for reuse, and a training step frees and re-allocates
many mid-sized activation buffers; the process's resident set then holds the high-water mark of a
fragmented heap. With this setting, allocations from 64 KiB up are served by ``mmap`` and given
back on ``free`` (``M_MMAP_THRESHOLD``), the heap's top is trimmed on every ``free``
(``M_TRIM_THRESHOLD`` 0), and one malloc arena serves every thread (``M_ARENA_MAX``). These are the
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_ARENA_MAX`` environment
variables set from inside the process (``mallopt(3)``), so they act on allocations made after the
run starts. Allocations cost a system call and page faults instead; outside glibc this is a no-op
that says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt(3) parameter numbers, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

SETTINGS = ((M_MMAP_THRESHOLD, 64 * 1024), (M_TRIM_THRESHOLD, 0), (M_ARENA_MAX, 1))


def release_freed_memory() -> str:
    """Apply ``SETTINGS`` with ``mallopt``; returns what was done, for the run's log."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return f"hardware.release_memory: no glibc mallopt here ({name}); allocator left as it is"
    if not all(mallopt(param, value) == 1 for param, value in SETTINGS):
        return "hardware.release_memory: mallopt refused a setting; allocator partly changed"
    return "hardware.release_memory: freed buffers return to the system (mmap from 64 KiB, trim at 0, 1 arena)"
