"""Host memory of runs whose blocks are offloaded or streamed, kept flat in depth (glibc's allocator settings).

Every allocation of :data:`MMAP_THRESHOLD` bytes or more gets pages of its own (:func:`map_large_allocations`, set
once at the first offloaded visit), returned to the OS when freed; after each offloaded block the heap's free pages
go back too (:func:`release_free_memory`). glibc's default raises its mmap threshold up to 32 MiB as large blocks are
freed, after which a block's Hessians, inverses and weight copies (1–16 MiB each) are carved from the heaps of the
threads that allocate them (torch's worker threads have their own): the peak of a visit then varied by ±30 MiB from
block to block with two threads, and the peak of a run (the worst visit) rose with the number of blocks. Nothing of
this applies where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable

#: allocations of at least this many bytes are mapped on their own while blocks are offloaded or streamed
MMAP_THRESHOLD = 2**20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):  # no C library to load by that name (Windows)
        return None


def libc_function(name: str) -> Callable[..., int] | None:
    """The C library's function ``name`` (glibc's ``mallopt``, ``malloc_trim``), or ``None`` where it has none."""
    lib = _libc()
    return None if lib is None else getattr(lib, name, None)


@functools.lru_cache(maxsize=1)
def map_large_allocations() -> bool:
    """Give every allocation of :data:`MMAP_THRESHOLD` bytes or more its own pages (glibc's ``mallopt``; process-wide,
    for the rest of the process, once; nothing elsewhere), so that freed blocks go back to the OS at once and the
    peak of a visit is what it holds, the same for every block (see the module docstring). Returns whether it was
    set."""
    if libc_function("malloc_trim") is None:  # not glibc: its mallopt, where there is one, does not do this
        return False
    mallopt = libc_function("mallopt")
    return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere). Called after the
    visit of an offloaded block: the block's buffers are freed by then, and without it a run's resident memory
    creeps up with heap fragmentation although what it holds does not grow with depth."""
    trim = libc_function("malloc_trim")
    if trim is not None:
        trim(0)
