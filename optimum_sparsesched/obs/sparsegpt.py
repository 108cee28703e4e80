"""SparseGPT: one-shot Optimal-Brain-Surgeon pruning (and joint GPTQ quantization) of one linear layer — the
column scan in plain torch, the reference every other scan reproduces.

Notation (Frantar & Alistarh, 2023). A layer computes ``Y = W X`` with ``W`` ``[rows, cols]`` and calibration
inputs ``X`` ``[cols, n]``. Its reconstruction loss ``||W X - Ŵ X||²`` has Hessian ``H = 2 X Xᵀ / n``
``[cols, cols]`` (float32; summed in float64 by :class:`..pipeline.hessians.HessianAccumulator`).

Removing weight ``w_q`` of a row and updating the remaining weights of that row optimally costs
``ε_q = w_q² / [H⁻¹]_qq`` and moves the others by ``δ = -(w_q / [H⁻¹]_qq) · H⁻¹_{:,q}``. SparseGPT processes the
columns left to right; after column ``q`` is fixed, the inverse Hessian of the remaining columns is a Schur
complement, and all of these are read off one upper Cholesky factor ``U`` of ``H⁻¹`` (:mod:`.inverse`): the row
``U[q, q:]`` is the (scaled) update direction and ``U[q, q]²`` the diagonal entry used by the saliency.

The scan (per layer, ``W`` float32 with dead inputs already zeroed):
1. columns are processed in blocks of ``block_size``; the masks are chosen as :mod:`.columns` says (unstructured:
   at the block start; N:M: every M columns);
2. within a block each column is pruned (masked entries set to 0) and/or quantized (the grid fitted at each group
   start), the error ``e = (w - q)/U_qq`` is spread over the rest of its sub-block of :data:`SUB_BLOCK` columns
   (``W₁[:, q+1:s₂] -= e · U[q, q+1:s₂]``), and after each sub-block the sub-block's errors update the rest of the
   block in one matrix product — every column still sees the updates of all columns before it when it is reached,
   only the sums are grouped differently (the same lazy batch update GPTQ/SparseGPT apply between blocks);
3. after the block the accumulated errors update all later columns in one matrix product (lazy batch update).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .columns import fit_group, mark_nm_, prune_count, unstructured_mask
from .grid import QuantGrid
from .spec import PruneSpec

Grids = list[tuple[torch.Tensor, torch.Tensor]]


def scan(W: torch.Tensor, U: torch.Tensor, spec: PruneSpec,
         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, float, Grids]:
    """The OBS column scan of ``W`` ``[rows, cols]`` (float32) with the Cholesky factor ``U`` ``[cols, cols]`` of
    ``H⁻¹``. Returns ``(Ŵ, loss ½Σe², grids)`` with the ``(scale, zero)`` ``[rows, 1]`` of every group in order.
    ``mask`` (bool ``[rows, cols]``, True = pruned) fixes which weights go instead of choosing them (the GPTQ pass
    of a support found by another solver)."""
    W = W.clone()
    rows, cols = W.shape
    nm, group_size = spec.nm, spec.group_size
    grid = QuantGrid(spec.bits, spec.sym) if spec.bits is not None else None
    grids: Grids = []
    if grid is not None and group_size == -1:
        grid.find_params(W)
        grids.append((grid.scale, grid.zero))
    total_prune = round(spec.sparsity * rows * cols)
    loss = torch.zeros((), dtype=torch.float32, device=W.device)
    zero = torch.zeros((), dtype=W.dtype, device=W.device)
    sub = sub_block(spec)
    for i1 in range(0, cols, spec.block_size):
        i2 = min(i1 + spec.block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1) if grid is not None else None
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        d2 = d.square().unsqueeze(0)
        if mask is not None:
            mask1 = mask[:, i1:i2]
        elif nm is None:
            mask1 = unstructured_mask(W1, d, prune_count(total_prune, i1, i2, cols))
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        with loop_threads(W):
            for s1 in range(0, i2 - i1, sub):
                s2 = min(s1 + sub, i2 - i1)
                for i in range(s1, s2):
                    w = W1[:, i]  # final for this column: the updates below reach only the columns after it
                    if mask is None and nm is not None and i % nm[1] == 0:
                        mark_nm_(mask1, W1, d2, i, nm)
                    if grid is None:  # (w - q) / d with q = 0 where pruned, w where kept
                        err = torch.where(mask1[:, i], w / d[i], zero)
                    else:
                        if group_size != -1 and (i1 + i) % group_size == 0:
                            grids.append(fit_group(grid, W, W1, mask1, i, i1, group_size))
                        q = grid.quantize(w.masked_fill(mask1[:, i], 0).unsqueeze(1)).squeeze(1)
                        Q1[:, i] = q.masked_fill_(mask1[:, i], 0)
                        err = (w - Q1[:, i]) / d[i]
                    Err1[:, i] = err
                    W1[:, i + 1:s2] -= torch.outer(err, U1[i, i + 1:s2])
                W1[:, s2:] -= Err1[:, s1:s2] @ U1[s1:s2, s2:]  # lazy update of the rest of the block
        loss += 0.5 * torch.sum(Err1**2)
        W[:, i1:i2] = W1.masked_fill_(mask1, 0) if grid is None else Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W, float(loss), grids


#: columns whose errors are spread one by one inside a column block; the rest of the block gets them in one product
SUB_BLOCK = 16


def sub_block(spec: PruneSpec) -> int:
    """The sub-block of :func:`scan`: :data:`SUB_BLOCK` columns (a multiple of M), or the whole ``block_size`` (every
    column's error spread at once over the rest of its block) where the sub-blocks would cut a column block, an
    N:M group or a quantization group."""
    sub = SUB_BLOCK if spec.nm is None else spec.nm[1] * -(-SUB_BLOCK // spec.nm[1])
    groups_fit = spec.bits is None or spec.group_size == -1 or spec.group_size % sub == 0
    return sub if spec.block_size % sub == 0 and groups_fit else spec.block_size


@contextmanager
def loop_threads(W: torch.Tensor) -> Iterator[None]:
    """One CPU thread for the column loop: its ops touch at most ``rows × block_size`` floats each, where a second
    thread only adds fork/join (and, on a busy machine, spinning) to every op; the lazy block updates outside
    the loop keep every thread. Nothing changes on a GPU or where torch already runs one thread."""
    threads = torch.get_num_threads()
    if W.device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
