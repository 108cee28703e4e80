"""The one block visit: where a decoder block's weights come from during a pass over the blocks, how candidate
weights are tried in it, and where compressed weights go.

Every pass over the blocks (the capture's one call of block 0, the weight digests of resume, the schedule's
measurement pass, the allocation search, the compression pass with its solve and block reconstruction, the writer
of a checkpoint) visits one block at a time through :meth:`BlockSource.visit`, a context manager that yields a
:class:`BlockVisit`. For the duration of the visit the block's weights are real on the compute device:

- **resident** blocks (in CPU or GPU memory) are moved to the compute device and back;
- **offloaded** blocks (accelerate hooks: a ``device_map`` with ``"disk"``/``"cpu"`` offload, ``cpu_offload``,
  ``disk_offload``; or a checkpoint streamed shard by shard, whose blocks transformers offloads to the checkpoint's
  own safetensors files) are onloaded once per visit through their hooks' weights maps (:mod:`.offload`) and
  dropped afterwards, so at most one block is ever materialised (with glibc's allocator kept flat in depth,
  :mod:`.host_memory`).

In a visit the block runs on one window (:meth:`BlockVisit.forward`, with the arguments the capture recorded for
it), and its compressed modules' weight matrices ``[out_features, in_features]`` are read (:meth:`~BlockVisit.weight`),
written in the module's own layout and dtype (:meth:`~BlockVisit.write`: a solve's result), or swapped in for a
while and swapped back bit for bit (:meth:`~BlockVisit.swapped`: a candidate the schedule or the search scores).
``visit.grids`` holds the quantization grids of the block's modules: those already known when the visit starts
(a solve of an earlier pass, a loaded checkpoint) and those the solve finds.

A visit opened with ``keep=True`` (the compression pass) hands the block on when it ends, after the block is back
home: to the ``sink`` when the source has one (the streaming path writes it into the output shards), else its
weights go back to the offload store they came from (resident weights are already updated in place) and its grids
into the source's ``grids`` (``config.results.grids``, which the savers read).

The source counts block loads and the seconds spent reading and writing them: ``describe()`` says what streaming
cost a run.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from ..obs.grid import Grid
from .blocks import BlockInputs, block_device, run_block
from .host_memory import map_large_allocations, release_free_memory
from .offload import hooks_executing_on, offloaded_tensors, onloaded, write_back
from .plan import CompressionPlan, is_transposed, set_weight_matrix, weight_matrix


@dataclass
class BlockVisit:
    """Block ``index`` of the plan, materialised on ``device`` (see the module docstring). ``modules``: its
    compressed modules by qualified name; ``inputs``: the captured block arguments (``None`` before the capture);
    ``grids``: the quantization grids of its modules, by qualified name."""

    index: int
    block: nn.Module
    modules: dict[str, nn.Module]
    device: torch.device
    inputs: BlockInputs | None = None
    grids: dict[str, Grid] = field(default_factory=dict)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The block's output hidden states on one window ``hidden`` ``[1, seq_len, hidden]``."""
        assert self.inputs is not None, "the block's arguments are captured first"
        return run_block(self.block, hidden, self.inputs.args[self.index], self.inputs.kwargs[self.index],
                         self.device, self.inputs.returns_tuple)

    def weight(self, name: str) -> torch.Tensor:
        """Module ``name``'s weight matrix ``[out, in]`` (a view of the parameter)."""
        return weight_matrix(self.modules[name])

    def write(self, weights: dict[str, torch.Tensor]) -> None:
        """Set each named module's weight to ``weights[name]`` ``[out, in]``, in its own layout and dtype."""
        for name, w in weights.items():
            set_weight_matrix(self.modules[name], w)

    @contextmanager
    def swapped(self, weights: dict[str, torch.Tensor]) -> Iterator[None]:
        """For the duration, the named modules compute with ``weights[name]`` ``[out, in]`` (cast to their dtype);
        afterwards their own weights are back, untouched."""
        own = {name: self.modules[name].weight.data for name in weights}
        try:
            for name, w in weights.items():
                module = self.modules[name]
                module.weight.data = torch.empty_like(own[name]).copy_(w.t() if is_transposed(module) else w)
            yield
        finally:
            for name, data in own.items():
                self.modules[name].weight.data = data


#: ``sink(visit)``: receives a visit opened with ``keep=True`` when it ends; the block is materialised (on its home
#: device) while the sink runs.
BlockSink = Callable[[BlockVisit], None]


def resident_home(block: nn.Module) -> torch.device:
    """Where the block's non-offloaded tensors live: the device of its first tensor not on ``meta`` (else the CPU)."""
    for t in (*block.parameters(), *block.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


class BlockSource:
    """The blocks of ``plan``, visited one at a time (see the module docstring). ``inputs``: the captured block
    arguments (set once captured); ``sink``: where kept blocks go instead of their offload store (the streaming
    path); ``grids``: the known grids of the compressed modules, where kept blocks' grids go without a sink."""

    def __init__(self, plan: CompressionPlan, inputs: BlockInputs | None = None, sink: BlockSink | None = None,
                 grids: dict[str, Grid] | None = None) -> None:
        self.plan = plan
        self.inputs = inputs
        self.sink = sink
        self.grids = grids if grids is not None else {}
        self.loads = 0  # visits that read a block's weights from an offload store or a checkpoint shard
        self.read_seconds = 0.0
        self.write_seconds = 0.0

    @property
    def offloaded(self) -> bool:
        """Whether any block's weights are offloaded (the passes then keep their per-block state small)."""
        return any(offloaded_tensors(b) for b in self.plan.blocks)

    @contextmanager
    def visit(self, index: int, device: torch.device | str, keep: bool = False,
              inputs: BlockInputs | None = None) -> Iterator[BlockVisit]:
        """Materialise block ``index`` on the compute device (its own GPU when a ``device_map`` put it on one, else
        ``device``) for the duration and yield its :class:`BlockVisit` (its block arguments from ``inputs``, else
        the source's); with ``keep``, hand it on afterwards (unless the body raised). The block is released in
        every case."""
        block, modules = self.plan.blocks[index], self.plan.modules[index]
        on = block_device(block, torch.device(device))
        home = resident_home(block)
        entries = offloaded_tensors(block)
        if entries:
            map_large_allocations()
        visit = BlockVisit(index, block, modules, on, inputs or self.inputs,
                           {n: self.grids[n] for n in modules if n in self.grids})
        start = time.perf_counter()
        with hooks_executing_on([block], on), onloaded(entries, on):
            if entries:
                self.loads += 1
                self.read_seconds += time.perf_counter() - start
            block.to(on)
            try:
                yield visit
            finally:
                block.to(home)
            if keep:
                start = time.perf_counter()
                self._hand_on(visit, entries)
                self.write_seconds += time.perf_counter() - start
        if entries:
            release_free_memory()

    def _hand_on(self, visit: BlockVisit, entries: dict) -> None:
        if self.sink is not None:
            self.sink(visit)
            return
        for module in visit.modules.values():
            entry = entries.get((id(module), "weight"))
            if entry is not None:
                write_back(entry, module.weight)
        self.grids.update({n: tuple(t.detach().cpu() for t in g) for n, g in visit.grids.items()})

    def describe(self) -> str:
        return (f"{self.loads} block loads from offloaded or streamed weights ({self.read_seconds:.1f} s reading, "
                f"{self.write_seconds:.1f} s handing compressed blocks on)")
