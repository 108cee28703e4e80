"""The OBS column scan with each ``block_size`` column block in a single Triton launch: the sibling of the torch scan
(:mod:`.sparsegpt`), chosen by :func:`.prune.prune` on CUDA.

The torch loop issues about ten small kernels per column; for SmolLM2-135M that
is ~10⁶ launches, which is where the reference SparseGPT spends its time on a GPU. Rows are independent inside a
column block — only the upper Cholesky factor ``U₁`` ``[B, B]`` of the block is shared — so each program takes a tile
of ``ROWS`` rows, keeps its ``[ROWS, B]`` slice of ``W₁`` in registers and walks the ``B`` columns in order:

    for i in 0..B-1:
        (N:M: at i % M == 0 prune the N smallest w²/U_jj² of columns i..i+M-1, per row)
        (grid: at a group start inside the block, fit scale/zero to the kept weights of the group's columns)
        q   = 0 where pruned, else w_i or its grid value
        e   = (w_i - q) / U_ii ;  loss += e²
        W₁[:, i:] -= e · U₁[i, i:]

and writes ``Q₁`` (the final block), ``E₁`` (the errors, for the lazy update ``W[:, i2:] -= E₁ U[i1:i2, i2:]``
that stays a torch matmul) and its share of the loss. Unstructured masks are chosen by torch before the launch
(a top-k over the whole block, :mod:`.columns`); grids whose groups start at the block start are fitted by torch
too (:func:`.columns.fit_group`), only grids of groups that start inside the block are fitted in the kernel. Arithmetic is float32 with IEEE division and
round-half-to-even, as in torch; results match the reference to float tolerance (a rounding tie can differ).

Runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (how the tests check it against the reference).
"""

from __future__ import annotations

import os

import torch

from .columns import fit_group, prune_count, unstructured_mask
from .grid import QuantGrid
from .spec import PruneSpec

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch loop is used
    triton = None

#: float32 round-half-to-even for |x| < 2²²: adding and subtracting 1.5·2²³ drops the fraction bits
_RINT_MAGIC = 12582912.0


def available(device: torch.device, spec: PruneSpec) -> bool:
    """Whether the kernel can run for tensors on ``device`` under ``spec``: triton installed, a CUDA device (or
    ``TRITON_INTERPRET=1``), and quantization groups that are a multiple or a divisor of the column block."""
    if triton is None or not (os.environ.get("TRITON_INTERPRET") == "1" or device.type == "cuda"):
        return False
    g, b = spec.group_size, spec.block_size
    return spec.bits is None or g == -1 or g % b == 0 or b % g == 0


def scan(W: torch.Tensor, U: torch.Tensor, spec: PruneSpec,
         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, float, list]:
    """The column scan of :func:`.sparsegpt.scan` (same arguments and results), one kernel launch per column block."""
    W = W.clone()
    rows, cols = W.shape
    group_size, block_size = spec.group_size, spec.block_size
    nm = spec.nm if mask is None else None  # a fixed mask is passed to the kernel as an unstructured one
    grid = QuantGrid(spec.bits, spec.sym) if spec.bits is not None else None
    grids = []
    if grid is not None and group_size == -1:
        grid.find_params(W)
        grids.append((grid.scale, grid.zero))
    torch_fits = grid is not None and (group_size == -1 or group_size % block_size == 0)
    total_prune = round(spec.sparsity * rows * cols)
    loss = torch.zeros((), dtype=torch.float32, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        if mask is not None:
            mask1 = mask[:, i1:i2].contiguous()
        elif nm is None:
            mask1 = unstructured_mask(W1, torch.diag(U1), prune_count(total_prune, i1, i2, cols))
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)  # N:M masks are chosen in the kernel
        block_grid = None
        if torch_fits:
            if group_size != -1 and i1 % group_size == 0:  # a group starts here: fit as the torch scan would
                grids.append(fit_group(grid, W, W1, mask1, 0, i1, group_size))
            block_grid = (grid.scale, grid.zero)
        Q1, Err1, block_loss, block_grids = obs_block(
            W1, U1, mask1 if nm is None else None, nm, block_grid, spec.bits, group_size, spec.sym)
        grids.extend(block_grids)
        loss += 0.5 * block_loss
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W, float(loss), grids


if triton is not None:

    @triton.jit
    def _extract(tile, cols, j):
        """Column ``j`` of a ``[ROWS, B]`` register tile as ``[ROWS]``."""
        return tl.sum(tl.where(cols[None, :] == j, tile, 0.0), axis=1)

    @triton.jit
    def _fit_grid(W, keep, maxq, SYM: tl.constexpr):
        """Per-row ``(scale, zero)`` of the kept entries of ``W`` (as :meth:`.QuantGrid.find_params`)."""
        big = 3.0e38
        any_kept = tl.sum(keep.to(tl.int32), axis=1) > 0
        xmin = tl.min(tl.where(keep, W, big), axis=1)
        xmax = tl.max(tl.where(keep, W, -big), axis=1)
        xmin = tl.minimum(tl.where(any_kept, xmin, 0.0), 0.0)
        xmax = tl.maximum(tl.where(any_kept, xmax, 0.0), 0.0)
        if SYM:
            xmax = tl.maximum(-xmin, xmax)
            xmin = -xmax
        flat = (xmin == 0.0) & (xmax == 0.0)
        xmin = tl.where(flat, -1.0, xmin)
        xmax = tl.where(flat, 1.0, xmax)
        scale = tl.math.div_rn(xmax - xmin, maxq)
        scale = ((scale.to(tl.int32, bitcast=True) + 0xFFFF) & -65536).to(tl.float32, bitcast=True)
        if SYM:
            zero = tl.zeros_like(scale) + tl.math.div_rn(maxq + 1.0, 2.0)
        else:
            zero = (tl.math.div_rn(-xmin, scale) + _RINT_MAGIC) - _RINT_MAGIC
            zero = tl.minimum(tl.maximum(zero, 0.0), maxq)
        return scale, zero

    @triton.jit
    def _obs_block_kernel(
        W_ptr, M_ptr, U_ptr, Q_ptr, E_ptr, loss_ptr, scale_ptr, zero_ptr, gscale_ptr, gzero_ptr,
        rows, count, stride_w, stride_u, maxq,
        B: tl.constexpr, ROWS: tl.constexpr, NM_N: tl.constexpr, NM_M: tl.constexpr,
        QUANT: tl.constexpr, GROUP: tl.constexpr, SYM: tl.constexpr, GROUPS_IN_BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        r = pid * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, B)
        inside = (r[:, None] < rows) & (cols[None, :] < count)
        offs = r[:, None] * stride_w + cols[None, :]
        W = tl.load(W_ptr + offs, mask=inside, other=0.0)
        if NM_M > 0:
            prune = tl.zeros([ROWS, B], dtype=tl.int1)
        else:
            prune = tl.load(M_ptr + offs, mask=inside, other=0) != 0
        Q = tl.zeros([ROWS, B], dtype=tl.float32)
        E = tl.zeros([ROWS, B], dtype=tl.float32)
        loss = tl.zeros([ROWS], dtype=tl.float32)
        scale = tl.zeros([ROWS], dtype=tl.float32)
        zero = tl.zeros([ROWS], dtype=tl.float32)
        if QUANT and not GROUPS_IN_BLOCK:  # one grid for the whole block, fitted by torch
            scale = tl.load(scale_ptr + r, mask=r < rows, other=1.0)
            zero = tl.load(zero_ptr + r, mask=r < rows, other=0.0)
        for i in range(0, count):
            d = tl.load(U_ptr + i * stride_u + i)
            urow = tl.load(U_ptr + i * stride_u + cols, mask=(cols >= i) & (cols < count), other=0.0)
            if NM_M > 0:
                if i % NM_M == 0:
                    for j in tl.static_range(NM_M):
                        dj = tl.load(U_ptr + (i + j) * stride_u + (i + j), mask=i + j < count, other=1.0)
                        wj = _extract(W, cols, i + j)
                        sj = tl.math.div_rn(wj * wj, dj * dj)
                        rank = tl.zeros([ROWS], dtype=tl.int32)
                        for k in tl.static_range(NM_M):
                            dk = tl.load(U_ptr + (i + k) * stride_u + (i + k), mask=i + k < count, other=1.0)
                            wk = _extract(W, cols, i + k)
                            sk = tl.math.div_rn(wk * wk, dk * dk)
                            if k < j:  # ties go to the lower column, as a stable top-k would
                                rank += (sk <= sj).to(tl.int32)
                            elif k > j:
                                rank += (sk < sj).to(tl.int32)
                        prune = prune | ((cols[None, :] == i + j) & (rank < NM_N)[:, None])
            if QUANT and GROUPS_IN_BLOCK:
                if i % GROUP == 0:
                    in_group = (cols >= i) & (cols < i + GROUP) & (cols < count)
                    scale, zero = _fit_grid(W, in_group[None, :] & (prune == 0), maxq, SYM)
                    g = i // GROUP
                    tl.store(gscale_ptr + r * GROUPS_IN_BLOCK + g, scale, mask=r < rows)
                    tl.store(gzero_ptr + r * GROUPS_IN_BLOCK + g, zero, mask=r < rows)
            w = _extract(W, cols, i)
            pruned = tl.sum(tl.where((cols[None, :] == i) & prune, 1, 0), axis=1) > 0
            q = tl.where(pruned, 0.0, w)
            if QUANT:
                code = (tl.math.div_rn(q, scale) + _RINT_MAGIC) - _RINT_MAGIC + zero
                code = tl.minimum(tl.maximum(code, 0.0), maxq)
                q = tl.where(pruned, 0.0, scale * (code - zero))
            e = tl.math.div_rn(w - q, d)
            loss += e * e
            W = W - e[:, None] * urow[None, :]
            at_i = cols[None, :] == i
            Q = tl.where(at_i, q[:, None], Q)
            E = tl.where(at_i, e[:, None], E)
        tl.store(Q_ptr + offs, Q, mask=inside)
        tl.store(E_ptr + offs, E, mask=inside)
        tl.store(loss_ptr + pid, tl.sum(loss, axis=0))


def obs_block(W1: torch.Tensor, U1: torch.Tensor, prune: torch.Tensor | None, nm: tuple[int, int] | None,
              grid: tuple[torch.Tensor, torch.Tensor] | None, bits: int | None, group_size: int, sym: bool,
              rows_per_program: int = 16) -> tuple[torch.Tensor, torch.Tensor, float, list]:
    """One column block: ``W1`` ``[rows, count]`` float32, ``U1`` ``[count, count]``, the unstructured ``prune``
    mask (``None`` for N:M), and for quantization either ``grid`` = ``(scale, zero)`` ``[rows, 1]`` fitted by torch
    for the whole block, or ``grid=None`` with ``group_size`` dividing the block (groups fitted in the kernel).

    Returns ``(Q1, E1, loss, grids)`` with ``grids`` the ``(scale, zero)`` pairs fitted in the kernel."""
    rows, count = W1.shape
    B = triton.next_power_of_2(count)
    W1, U1 = W1.contiguous(), U1.contiguous()
    Q1, E1 = torch.empty_like(W1), torch.empty_like(W1)
    programs = triton.cdiv(rows, rows_per_program)
    loss = torch.empty(programs, dtype=torch.float32, device=W1.device)
    quant = bits is not None
    in_block = quant and grid is None
    groups = triton.cdiv(count, group_size) if in_block else 0
    gscale = torch.empty(rows, max(groups, 1), dtype=torch.float32, device=W1.device)
    gzero = torch.empty_like(gscale)
    scale, zero = (t.reshape(-1).contiguous() for t in grid) if grid is not None else (gscale, gzero)
    mask = prune.to(torch.int8).contiguous() if prune is not None else W1
    _obs_block_kernel[(programs,)](
        W1, mask, U1, Q1, E1, loss, scale, zero, gscale, gzero,
        rows, count, W1.stride(0), U1.stride(0), float(2**bits - 1) if quant else 1.0,
        B=B, ROWS=rows_per_program, NM_N=nm[0] if nm else 0, NM_M=nm[1] if nm else 0,
        QUANT=quant, GROUP=group_size if in_block else 1, SYM=sym, GROUPS_IN_BLOCK=groups,
    )
    grids = [(gscale[:, g:g + 1], gzero[:, g:g + 1]) for g in range(groups)]
    return Q1, E1, float(loss.sum()), grids
