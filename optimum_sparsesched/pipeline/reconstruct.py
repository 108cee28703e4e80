"""Block reconstruction: after a block's modules are compressed, a few epochs of Adam on their kept weights (the
mask fixed) so that the compressed block reproduces the dense model's output of that block.

Objective, per calibration window ``j`` (hidden states ``[1, S, d]``)::

    ℓ_j(Ŵ) = ‖f_b(Ŵ; X̂_j) − Y_j‖² / ‖Y_j‖²,        Y_j = f_b(W; X_j)

with ``X̂_j`` the window's input to block ``b`` in the compressed model (the stream the sequential pass carries),
``X_j`` its input in the dense model (a second stream carried beside it) and ``f_b`` the whole block (norms,
attention, MLP, residuals). The OBS solve minimises ``‖W X̂ − Ŵ X̂‖²`` for every Linear alone; this objective sees
how the block's modules act together and aims at the dense activations, so it also corrects part of the error the
blocks before it left in ``X̂`` (block-wise reconstruction as in EBFT, Guo et al. 2024).

- **Mask.** ``M = (Ŵ ≠ 0)`` after the OBS solve; every gradient is multiplied by ``M`` and the weights are masked
  after every step: the sparsity, and any N:M pattern, stay exactly those of the solve.
- **Optimiser.** Adam (learning rate ``lr``, cosine decay to 0 over ``epochs × windows`` steps), one window per step,
  on float32 master copies of the weights whatever the model dtype (the forward runs in the model dtype).
- **Quantized weights** (``bits``): at the end every weight is rounded back onto its module's grid (the grid of the
  OBS solve, unchanged), so the stored codes still describe the weights exactly.
- **Guard.** The mean ``ℓ`` over all windows is measured before and after; the new weights are kept only if it is
  lower, else the solve's weights are restored: never worse than the OBS result on the calibration windows.
- **Distributed.** The steps are the single process's: one epoch visits every calibration window once, in the
  order of one seeded permutation of all ``N`` windows (rank ``r`` holds windows ``r, r + world, …``); each step's
  gradient is computed by the rank holding that window and broadcast, and the errors before and after are summed
  in window order, so every rank takes the single process's steps and keeps the single process's weights (up to
  float summation order inside a forward). Only the owner of a window works at a step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..obs.grid import column_groups, module_grid, round_onto_grid
from .blocks import BlockInputs, run_block
from .distributed import DistributedContext
from .plan import is_transposed, weight_matrix


@dataclass(frozen=True)
class Reconstruction:
    """The block's mean relative output error ``ℓ`` before and after, and whether the new weights were kept."""

    before: float
    after: float
    kept: bool


def _relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    target = target.detach().to(out.device, torch.float32)
    return ((out.float() - target) ** 2).sum() / (target**2).sum().clamp_min(torch.finfo(torch.float32).tiny)


def _on_grid(module: nn.Module, w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """``w`` ``[rows, cols]`` (float32) rounded onto the module's ``bits``-bit grids ``(scale, zero)``
    ``[rows, groups]`` (columns in consecutive groups of ``group_size``; ``-1``: one group per row)."""
    g = column_groups(w.shape[1], group_size, w.device)
    scale, zero = (t.to(w.device)[:, g] for t in module_grid(module))
    return round_onto_grid(w, scale, zero, 2**bits - 1)


@torch.no_grad()
def reconstruct_block(block: nn.Module, modules: dict[str, nn.Module], inputs: BlockInputs, index: int,
                      targets: list[torch.Tensor], device: torch.device | str, epochs: int, lr: float,
                      ctx: DistributedContext, seed: int = 0, bits: int | None = None,
                      group_size: int = -1) -> Reconstruction:
    """Adjust the kept weights of ``modules`` (block ``index``, already compressed) in place so that the block's
    output on ``inputs.hidden`` (its compressed-model inputs) approaches ``targets`` (the dense block's outputs on
    the dense inputs), ``epochs`` passes over the windows. Returns the errors before and after."""
    weights = [m.weight for m in modules.values()]
    if not weights:
        return Reconstruction(0.0, 0.0, False)
    masks = [w != 0 for w in weights]
    saved = [w.detach().clone() for w in weights]
    masters = [w.detach().float() * m for w, m in zip(weights, masks)]
    args, kwargs, returns_tuple = inputs.args[index], inputs.kwargs[index], inputs.returns_tuple

    def window_error(j: int) -> torch.Tensor:
        return _relative_error(run_block(block, inputs.hidden[j], args, kwargs, device, returns_tuple), targets[j])

    local = len(inputs.hidden)
    total = sum(ctx.merge_dicts({ctx.rank: local}).values())  # N: every rank's windows

    def mean_error() -> float:  # summed in window order, as one process sums them
        errors = ctx.merge_dicts({g: float(window_error(g // ctx.world))
                                  for g in range(ctx.rank, total, ctx.world)})
        return sum(errors[g] for g in range(total)) / max(total, 1)

    before = mean_error()
    total_steps = max(epochs * total, 1)
    optimizer = torch.optim.Adam(masters, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    generator = torch.Generator().manual_seed((seed + index) % 2**63)
    requires = {p: p.requires_grad for p in block.parameters()}
    try:
        for p in block.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        for _ in range(epochs):
            for g in torch.randperm(total, generator=generator).tolist():  # global window g: rank g % world
                owner = g % ctx.world
                if owner == ctx.rank:
                    with torch.enable_grad():
                        window_error(g // ctx.world).backward()
                for master, w, m in zip(masters, weights, masks):
                    grad = (w.grad.float() * m) if owner == ctx.rank else torch.zeros_like(master)
                    ctx.broadcast_(grad, src=owner)
                    master.grad = grad
                optimizer.step()
                schedule.step()
                for w, master, m in zip(weights, masters, masks):
                    master.mul_(m)
                    w.grad = None
                    w.data.copy_(master)
    finally:
        for w in weights:
            w.grad = None
        for p, flag in requires.items():
            p.requires_grad_(flag)
    if bits is not None:
        for module, w, m in zip(modules.values(), weights, masks):
            rounded = _on_grid(module, weight_matrix(module).float(), bits, group_size)
            w.data.copy_((rounded.t() if is_transposed(module) else rounded) * m)
    after = mean_error()
    kept = after < before and all(bool(torch.isfinite(w).all()) for w in weights)
    if not kept:
        for w, s in zip(weights, saved):
            w.data.copy_(s)
    return Reconstruction(before, after if kept else before, kept)
