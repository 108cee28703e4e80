"""Block reconstruction: after a block's modules are compressed, a few epochs of Adam on their kept weights (the
mask fixed) so that the compressed block reproduces the dense model's output of that block — the block-level
refinement of the layer solvers beside it (:mod:`.prune`).

Objective, per calibration window ``j`` (hidden states ``[1, S, d]``)::

    ℓ_j(Ŵ) = ‖f_b(Ŵ; X̂_j) − Y_j‖² / ‖Y_j‖²,        Y_j = f_b(W; X_j)

with ``X̂_j`` the window's input to block ``b`` in the compressed model, ``X_j`` its input in the dense model and
``f_b`` the whole block (norms, attention, MLP, residuals). The OBS solve minimises ``‖W X̂ − Ŵ X̂‖²`` for every
Linear alone; this objective sees how the block's modules act together and aims at the dense activations, so it also
corrects part of the error the blocks before it left in ``X̂`` (block-wise reconstruction as in EBFT, Guo et al.
2024). The caller gives the block as a function ``forward(j)`` (window ``j``'s output, with the gradient) and the
targets ``Y_j``; nothing here knows about models, devices or ranks beyond that.

- **Targets** (``target``). ``"dense"``: ``Y_j = f_b(W; X_j)``, the dense model's output of the block (the caller
  carries the dense model's hidden states beside the compressed ones: one more block forward per window and a second
  copy of the hidden states). ``"local"``: ``Y_j = f_b(W; X̂_j)``, the dense block on the compressed inputs (recorded
  by the Hessian forward, which runs on ``X̂_j`` anyway: no second stream). The local target leaves the upstream
  error alone and fits only the block's own; the dense one also corrects part of the upstream error, and partly
  fits the calibration text's activations.
- **Mask.** ``M = (Ŵ ≠ 0)`` after the OBS solve; the weights are multiplied by ``M`` after every step (Adam is
  elementwise, so a pruned entry's update never reaches a kept one): the sparsity, and any N:M pattern, stay exactly
  those of the solve.
- **Optimiser.** Adam (learning rate ``lr``, cosine decay to 0 over ``epochs × windows`` steps), one window per step,
  fused where the device has the kernel; float32 weights are trained in place, others through float32 master copies
  (the forward runs in the model dtype).
- **Quantized weights** (``bits``): at the end every weight is rounded back onto its module's grid (the grid of the
  OBS solve, unchanged), so the stored codes still describe the weights exactly.
- **Guard.** The mean ``ℓ`` over all windows is measured before and after; the new weights are kept only if it is
  lower and finite, else the solve's weights are restored bit for bit: never worse than the OBS result on the
  calibration windows. The after pass computes the block's output on every window with the final weights: handed
  to ``emit``, they are the next block's inputs when the weights are kept (the caller need not run the block again).
- **Distributed** (a :class:`Reducer`): the steps are the single process's. Rank ``r`` holds the global windows
  ``r, r + world, …``; one epoch visits every window once in the order of one seeded permutation of all ``N``
  windows; each step's gradient is computed by the rank holding that window and summed over the ranks (the others
  add zeros, an exact sum), and the errors before and after are summed in window order, so every rank takes the
  single process's steps and keeps the single process's weights. (Several windows per step would sum their
  gradients in an order that depends on how the windows are spread over the ranks: one window per step keeps the
  launch out of the result.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from .grid import column_groups, round_onto_grid


class Reducer(Protocol):
    """The collectives reconstruction needs (``pipeline.distributed.DistributedContext`` is one)."""

    rank: int
    world: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


class SingleProcess:
    """The :class:`Reducer` of one process."""

    rank, world = 0, 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


#: what block reconstruction aims at (module docstring, "Targets")
RECONSTRUCT_TARGETS = ("dense", "local")


@dataclass(frozen=True)
class ReconstructSpec:
    """``epochs`` over the windows at learning rate ``lr`` (cosine decay), the window order drawn from ``seed`` and
    the block index; with ``bits`` the weights are rounded back onto their ``group_size`` grids at the end;
    ``target``: which outputs the caller hands in as targets (:data:`RECONSTRUCT_TARGETS`)."""

    epochs: int
    lr: float
    seed: int = 0
    bits: int | None = None
    group_size: int = -1
    target: str = "dense"


@dataclass(frozen=True)
class KeptWeight:
    """One compressed module's weight as reconstruction sees it: ``param`` (in the module's own layout;
    ``transposed`` when that is ``[in, out]``, GPT-2's Conv1D) and its quantization ``grid`` ``(scale, zero)``
    float32 ``[out, groups]`` (``None`` when not quantized)."""

    param: nn.Parameter
    transposed: bool = False
    grid: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class Reconstruction:
    """The block's mean relative output error ``ℓ`` before and after, and whether the new weights were kept."""

    before: float
    after: float
    kept: bool


def relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``‖out − target‖² / ‖target‖²`` in float32 (a 0-dim tensor, differentiable in ``out``)."""
    target = target.detach().to(out.device, torch.float32)
    return ((out.float() - target) ** 2).sum() / (target**2).sum().clamp_min(torch.finfo(torch.float32).tiny)


def on_grid(w: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """``w`` ``[rows, cols]`` (float32) rounded onto its ``bits``-bit grids ``(scale, zero)`` ``[rows, groups]``
    (columns in consecutive groups of ``group_size``; ``-1``: one group per row)."""
    g = column_groups(w.shape[1], group_size, w.device)
    scale, zero = (t.to(w.device)[:, g] for t in grid)
    return round_onto_grid(w, scale, zero, 2**bits - 1)


def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam over ``params``, with the fused kernel (one pass over the weights per step) where the device has one."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(params, lr=lr)


@torch.no_grad()
def reconstruct_block(weights: Sequence[KeptWeight], forward: Callable[[int], torch.Tensor],
                      targets: Sequence[torch.Tensor], spec: ReconstructSpec, block_index: int = 0,
                      reducer: Reducer | None = None, frozen: Sequence[nn.Parameter] = (),
                      emit: Callable[[int, torch.Tensor], None] | None = None) -> Reconstruction:
    """Adjust the kept entries of ``weights`` in place so that ``forward(j)`` (the block's output on its
    compressed-model input ``j``, ``j < len(targets)``) approaches ``targets[j]``, ``spec.epochs`` passes over the
    windows; ``frozen``: the block's other parameters, held without gradients meanwhile. ``emit(j, out)`` receives
    the after pass's output of every window (with the weights the guard then keeps or refuses). Returns the errors
    before and after."""
    reducer = reducer or SingleProcess()
    params = [w.param for w in weights]
    if not params:
        return Reconstruction(0.0, 0.0, False)
    count = len(targets)
    saved = [p.detach().clone() for p in params]
    # float32 weights are Adam's own parameters; other dtypes train float32 copies written back after every step
    masters = [p if p.dtype == torch.float32 else p.detach().float() for p in params]
    keeps = [(m != 0).to(torch.float32) for m in masters]

    def window_error(j: int) -> torch.Tensor:
        return relative_error(forward(j), targets[j])

    rank, world, device = reducer.rank, reducer.world, masters[0].device  # (NCCL reduces device tensors only)
    total = int(reducer.all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64, device=device)).item())

    def mean_error(outputs: Callable[[int, torch.Tensor], None] | None = None) -> float:
        errors = torch.zeros(total, dtype=torch.float64, device=device)  # summed in global window order
        for j in range(count):
            out = forward(j)
            errors[rank + j * world] = float(relative_error(out, targets[j]))
            if outputs is not None:
                outputs(j, out)
        return sum(reducer.all_reduce_sum(errors).tolist()) / max(total, 1)

    before = mean_error()
    optimizer = _adam(masters, spec.lr)
    total_steps = max(spec.epochs * total, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    generator = torch.Generator().manual_seed((spec.seed + block_index) % 2**63)
    requires = {p: p.requires_grad for p in (*frozen, *params)}
    try:
        for p in frozen:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for _ in range(spec.epochs):
            for g in torch.randperm(total, generator=generator).tolist():  # global window g, on rank g % world
                mine = g % world == rank
                if mine:
                    with torch.enable_grad():
                        window_error(g // world).backward()
                for p, master in zip(params, masters):
                    grad = p.grad if mine else None
                    p.grad = None
                    grad = torch.zeros_like(master) if grad is None else grad.to(torch.float32)
                    master.grad = reducer.all_reduce_sum(grad)
                optimizer.step()
                schedule.step()
                for p, master, keep in zip(params, masters, keeps):
                    master.grad = None
                    master.mul_(keep)
                    if master is not p:
                        p.copy_(master)
    finally:
        for p in params:
            p.grad = None
        for p, flag in requires.items():
            p.requires_grad_(flag)
    if spec.bits is not None:
        for w, keep in zip(weights, keeps):
            if w.grid is not None:
                matrix = w.param.t() if w.transposed else w.param
                rounded = on_grid(matrix.float(), w.grid, spec.bits, spec.group_size)
                w.param.copy_((rounded.t() if w.transposed else rounded) * keep)
    after = mean_error(emit)
    kept = after < before and all(bool(torch.isfinite(p).all()) for p in params)
    if not kept:
        for p, s in zip(params, saved):
            p.copy_(s)
    return Reconstruction(before, after if kept else before, kept)
