"""Compression on torch.distributed: launched with ``torchrun --nproc-per-node N`` (or ``accelerate launch``) around
the same ``from_pretrained(..., quantization_config=cfg)`` / ``compress`` / CLI call, with no distributed code in the
user's script.

Work split (every rank holds the whole model, on CPU or offloaded as usual):
- calibration windows are drawn identically on every rank (same seed); rank ``r`` captures and propagates windows
  ``r, r + N, r + 2N, …``;
- per block, every rank sums the Hessian products of its windows in float64 (``S_r``, ``n_r`` tokens); one
  all-reduce of ``S_r`` and of ``n_r`` gives the single-process ``H = 2 Σ S_r / Σ n_r`` bit for bit
  (:mod:`.hessians`), so every solver sees the Hessian a single process sees;
- the modules of a block are solved round-robin on the ranks and each result is broadcast from its owner;
- the schedule's statistics are measured by rank 0 (on the same probe windows a single process uses) and broadcast;
- rank 0 writes checkpoints and ``save_pretrained`` output.

Communication per block: the Hessian sums, ``Σ_modules cols² · 8`` bytes all-reduced, plus the compressed weights
broadcast once (``Σ rows · cols`` in the model dtype).
When ``WORLD_SIZE > 1`` and no process group exists yet, one is initialised (NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..obs.grid import Grid, group_count
from .plan import weight_matrix


def is_main_process() -> bool:
    """False on every rank but 0 of an initialised process group (those ranks neither save nor print results)."""
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


@dataclass
class DistributedContext:
    """Rank, world size and the collectives compression needs; a no-op when ``world == 1``."""

    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owner(self, index: int) -> int:
        """The rank that solves the ``index``-th module of a block."""
        return index % self.world

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``Σ_r tensor_r`` over all ranks, in place; returns ``tensor``."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``Σ_r tensor_r`` over all ranks (a new tensor; ``tensor`` itself when ``world == 1``)."""
        if not self.enabled:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    def broadcast_(self, tensor: torch.Tensor, src: int) -> None:
        """In-place broadcast of ``tensor`` from rank ``src``."""
        if not self.enabled:
            return
        buf = tensor.data.contiguous()
        dist.broadcast(buf, src=src)
        if buf.data_ptr() != tensor.data.data_ptr():
            tensor.data.copy_(buf)

    def owned(self, names: list[str]) -> list[str]:
        """The modules of a block (``names``, in block order) this rank solves: the ``k``-th goes to rank
        ``k mod world``."""
        return [name for k, name in enumerate(names) if self.owner(k) == self.rank]

    def share_solved(self, modules: dict[str, nn.Module], grids: dict[str, Grid], group_size: int | None) -> None:
        """Send every solved module of a block from the rank that solved it (:meth:`owned`) to every rank: its
        weight and, when quantized in groups of ``group_size`` inputs (``-1``: one group per row; ``None``: not
        quantized), its grid ``[rows, groups]`` (into ``grids``)."""
        if not self.enabled:
            return
        for k, (name, module) in enumerate(modules.items()):
            src = self.owner(k)
            self.broadcast_(module.weight, src=src)
            if group_size is not None:
                rows, cols = weight_matrix(module).shape
                grid = grids.get(name) or tuple(torch.empty(rows, group_count(cols, group_size)) for _ in range(2))
                grid = tuple(t.to(module.weight.device) for t in grid)  # NCCL broadcasts device tensors only
                for t in grid:
                    self.broadcast_(t, src=src)
                grids[name] = tuple(t.cpu() for t in grid)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def merge_dicts(self, local: dict) -> dict:
        """Union of every rank's ``local`` dict."""
        if not self.enabled:
            return local
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, local)
        merged: dict = {}
        for part in gathered:
            merged.update(part)
        return merged

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed() -> DistributedContext:
    """The current process group, or a new one when the launcher's environment says ``WORLD_SIZE > 1``."""
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(rank=dist.get_rank(), world=dist.get_world_size())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistributedContext()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    return DistributedContext(rank=dist.get_rank(), world=dist.get_world_size())
