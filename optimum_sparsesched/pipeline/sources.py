"""Where a decoder block's weights come from during a pass over the blocks, and where compressed weights go.

Every pass over the blocks (the capture's one call of block 0, the schedule's measurement pass, the compression
pass, a save of an offloaded model) visits one block at a time through :meth:`BlockSource.visit`, which makes the
block's weights real on the compute device for the duration of the visit:

- **resident** blocks (in CPU or GPU memory) are moved to the compute device and back, as always;
- **offloaded** blocks (accelerate hooks: a ``device_map`` with ``"disk"``/``"cpu"`` offload, ``cpu_offload``,
  ``disk_offload``; or a checkpoint streamed shard by shard, whose blocks transformers offloads to the checkpoint's
  own safetensors files) are onloaded once per visit through their hooks' weights maps (:mod:`.offload`) and
  dropped afterwards, so at most one block is ever materialised.

A visit that changed weights (``updated``: the block's compressed modules) hands them on when it ends, after the
block is back home: to the ``sink`` when one is given (the streaming path writes them into the output shards),
else to the offload store the weights came from (resident weights are already updated in place).

The source counts block loads and the seconds spent reading and writing them: ``describe()`` says what streaming
cost a run.

Host memory of offloaded or streamed runs is kept flat in depth on glibc (:func:`map_large_allocations`, set at the
first offloaded visit): every allocation of :data:`MMAP_THRESHOLD` bytes or more gets pages of its own, returned
to the OS when freed. glibc's default raises that threshold up to 32 MiB as large blocks are freed, after which a
block's Hessians, inverses and weight copies (1–16 MiB each) are carved from the heaps of the threads that
allocate them (torch's worker threads have their own): the peak of a visit then varied by ±30 MiB from block to
block with two threads, and the peak of a run (the worst visit) rose with the number of blocks.
"""

from __future__ import annotations

import ctypes
import functools
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from .blocks import block_device
from .offload import hooks_executing_on, offloaded_tensors, onloaded, write_back

#: ``sink(index, block, modules)``: receives block ``index`` after a visit that updated ``modules``
#: (qualified name -> module); the block is materialised (on its home device) while the sink runs.
BlockSink = Callable[[int, nn.Module, dict[str, nn.Module]], None]


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


def resident_home(block: nn.Module) -> torch.device:
    """Where the block's non-offloaded tensors live: the device of its first tensor not on ``meta`` (else the CPU)."""
    for t in (*block.parameters(), *block.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


class BlockSource:
    """The blocks of one model, visited one at a time (see the module docstring). ``sink``: where updated blocks
    go instead of their offload store (the streaming path); ``None`` writes them back where they live."""

    def __init__(self, sink: BlockSink | None = None) -> None:
        self.sink = sink
        self.loads = 0  # visits that read a block's weights from an offload store or a checkpoint shard
        self.read_seconds = 0.0
        self.write_seconds = 0.0

    @contextmanager
    def visit(self, index: int, block: nn.Module, device: torch.device | str,
              updated: dict[str, nn.Module] | None = None) -> Iterator[torch.device]:
        """Materialise ``block`` on the compute device (its own GPU when a ``device_map`` put it on one, else
        ``device``) for the duration and yield that device; afterwards hand ``updated`` on (unless the body
        raised) and release the block."""
        device = torch.device(device)
        on = block_device(block, device)
        home = resident_home(block)
        entries = offloaded_tensors(block)
        if entries:
            map_large_allocations()
        start = time.perf_counter()
        with hooks_executing_on([block], on), onloaded(entries, on):
            if entries:
                self.loads += 1
                self.read_seconds += time.perf_counter() - start
            block.to(on)
            try:
                yield on
            finally:
                block.to(home)
            if updated is not None:
                start = time.perf_counter()
                self._hand_on(index, block, updated, entries)
                self.write_seconds += time.perf_counter() - start
        if entries:
            release_free_memory()

    def _hand_on(self, index: int, block: nn.Module, updated: dict[str, nn.Module], entries: dict) -> None:
        if self.sink is not None:
            self.sink(index, block, updated)
            return
        for module in updated.values():
            entry = entries.get((id(module), "weight"))
            if entry is not None:
                write_back(entry, module.weight)

    def describe(self) -> str:
        return (f"{self.loads} block loads from offloaded or streamed weights ({self.read_seconds:.1f} s reading, "
                f"{self.write_seconds:.1f} s handing compressed blocks on)")


def is_offloaded(blocks: nn.ModuleList) -> bool:
    """Whether any block's weights are offloaded (the passes then keep their per-block state small)."""
    return any(offloaded_tensors(b) for b in blocks)
