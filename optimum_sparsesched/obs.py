"""SparseGPT: one-shot Optimal-Brain-Surgeon pruning (and joint GPTQ quantization) of one linear layer.

Notation (Frantar & Alistarh, 2023). A layer computes ``Y = W X`` with ``W`` ``[rows, cols]`` and calibration
inputs ``X`` ``[cols, n]``. Its reconstruction loss ``||W X - Ŵ X||²`` has Hessian ``H = 2 X Xᵀ / n``
``[cols, cols]`` (accumulated in float32 by :class:`.hessian.HessianAccumulator`).

Removing weight ``w_q`` of a row and updating the remaining weights of that row optimally costs
``ε_q = w_q² / [H⁻¹]_qq`` and moves the others by ``δ = -(w_q / [H⁻¹]_qq) · H⁻¹_{:,q}``. SparseGPT processes the
columns left to right; after column ``q`` is fixed, the inverse Hessian of the remaining columns is a Schur
complement, and all of these are read off one upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = Uᵀ U``): the row
``U[q, q:]`` is the (scaled) update direction and ``U[q, q]²`` the diagonal entry used by the saliency.

Algorithm (per layer):
1. dead inputs (``H_ii = 0``) get ``H_ii = 1`` and zero weights; damping ``λ = damp · mean(diag H)`` is added to
   the diagonal, escalated ×10 while the Cholesky factorisation fails;
2. columns are processed in blocks of ``block_size``. For unstructured sparsity the mask of a block is chosen
   adaptively at its start: the ``s``-fraction of smallest saliencies ``w² / U_qq²`` of the block (over all rows);
   for ``N:M`` the N smallest saliencies of every M consecutive columns of each row are chosen when the scan
   reaches them;
3. within a block each column is pruned (masked entries set to 0) and/or quantized, the error ``e = (w - q)/U_qq``
   is spread over the rest of the block (``W[:, q:] -= e · U[q, q:]``), and after the block the accumulated errors
   update all later columns in one matrix product (lazy batch update).
All arithmetic is float32 whatever the model dtype; a result with NaN/Inf is never written back.
"""

from __future__ import annotations

import logging
import os

import torch

from .quantization import QuantGrid

logger = logging.getLogger(__name__)

MAX_DAMP_ESCALATIONS = 8
KERNEL_ENV = "OPTIMUM_SPARSESCHED_OBS_KERNEL"  # "torch" | "triton" | "auto": the column loop used by prune()


def inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``, escalating λ ×10 on failure.

    Returns ``(U, λ used)``. ``H`` must already have its dead diagonal entries set to 1.
    """
    diag_mean = torch.mean(torch.diag(H)).item()
    lam = damp * diag_mean if diag_mean > 0 else damp
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for attempt in range(MAX_DAMP_ESCALATIONS + 1):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info.item() == 0 and torch.isfinite(U).all():
                return U, lam
        logger.warning("Cholesky failed with damping %.3g (attempt %d); escalating x10", lam, attempt + 1)
        lam *= 10.0
    raise torch.linalg.LinAlgError(f"Hessian is not positive definite even with damping {lam / 10:.3g}")


class InverseHessian:
    """One Hessian prepared for OBS: dead inputs (``H_ii = 0``) marked and given ``H_ii = 1``, and the upper
    Cholesky factor ``U`` of ``(H + λI)⁻¹`` computed once per damping level, then shared by every module that reads
    the same input (q/k/v, gate/up)."""

    def __init__(self, H: torch.Tensor, damp: float) -> None:
        H = H.to(torch.float32).clone()
        self.dead = torch.diag(H) == 0
        H[self.dead, self.dead] = 1.0
        self.H = H
        self.damp = damp
        self._factors: dict[int, torch.Tensor] = {}

    def factor(self, escalation: int = 0) -> torch.Tensor:
        """``U`` at damping ``damp · 10^escalation`` (further escalated inside if the Cholesky fails)."""
        if escalation not in self._factors:
            self._factors[escalation], _ = inverse_hessian_cholesky(self.H, self.damp * 10.0**escalation)
        return self._factors[escalation]


class SparseGPT:
    """OBS pruning (+ optional quantization) of one weight matrix ``W`` ``[rows, cols]`` given its Hessian
    (a ``[cols, cols]`` tensor, or an :class:`InverseHessian` shared with other modules)."""

    def __init__(self, weight: torch.Tensor, H: torch.Tensor | InverseHessian) -> None:
        self.weight = weight
        self.H = H
        #: after a quantized ``prune``: the grids used, ``[rows, groups]`` float32 each (group ``j`` covers
        #: columns ``j·group_size ...``; one group for ``group_size=-1``); ``None`` without quantization.
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None

    @torch.no_grad()
    def prune(
        self,
        sparsity: float,
        nm: tuple[int, int] | None = None,
        bits: int | None = None,
        group_size: int = 128,
        sym: bool = False,
        block_size: int = 128,
        damp: float = 0.01,
        kernel: str = "auto",
    ) -> tuple[torch.Tensor, float]:
        """Return ``(Ŵ, loss)``: the pruned/quantized weight (float32, same shape) and the OBS loss estimate
        ``½ Σ e²`` accumulated over all columns (the increase of ``||WX - ŴX||²/n`` predicted by OBS).
        ``damp`` applies when the Hessian is given as a tensor (an ``InverseHessian`` carries its own).
        ``kernel``: ``"torch"`` (the column loop below), ``"triton"`` (one launch per column block,
        :mod:`.obs_triton`) or ``"auto"`` (the ``OPTIMUM_SPARSESCHED_OBS_KERNEL`` environment variable if set, else
        Triton on CUDA when it is installed)."""
        if kernel == "auto":
            kernel = os.environ.get(KERNEL_ENV, "auto")
        if kernel not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel: {kernel!r} is not valid; allowed: 'auto' | 'torch' | 'triton'")
        W = self.weight.detach().to(torch.float32).clone().contiguous()
        inverse = self.H if isinstance(self.H, InverseHessian) else InverseHessian(self.H.to(W.device), damp)
        W[:, inverse.dead] = 0.0

        grid = QuantGrid(bits, sym) if bits is not None else None
        if grid is not None and group_size == -1:
            grid.find_params(W)

        for escalation in range(MAX_DAMP_ESCALATIONS):
            U = inverse.factor(escalation)
            Q, loss, grids = self._scan(W, U, sparsity, nm, grid, group_size, block_size,
                                        self._use_triton(kernel, W.device, grid, group_size, block_size))
            if torch.isfinite(Q).all():
                if grids:
                    self.scale = torch.cat([scale for scale, _ in grids], dim=1)
                    self.zero = torch.cat([zero for _, zero in grids], dim=1)
                return Q, loss
            logger.warning("OBS produced non-finite weights; retrying with more damping")
        raise FloatingPointError("OBS pruning produced non-finite weights at every damping level")

    @staticmethod
    def _use_triton(kernel: str, device: torch.device, grid, group_size: int, block_size: int) -> bool:
        from . import obs_triton

        usable = obs_triton.available(device) and (
            grid is None or group_size == -1 or group_size % block_size == 0 or block_size % group_size == 0)
        if kernel == "triton" and not usable:
            raise ValueError("kernel: 'triton' needs the triton package and a CUDA tensor (or TRITON_INTERPRET=1), "
                             "and group_size a multiple or a divisor of block_size")
        return usable and kernel != "torch"

    @staticmethod
    def _scan(W, U, sparsity, nm, grid, group_size, block_size, fast=False):
        W = W.clone()
        rows, cols = W.shape
        grids = [(grid.scale, grid.zero)] if grid is not None and group_size == -1 else []
        total_prune = round(sparsity * rows * cols)
        loss = torch.zeros((), dtype=torch.float32, device=W.device)
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            U1 = U[i1:i2, i1:i2]
            d = torch.diag(U1)

            if nm is None:
                # exact cumulative count, so the layer total is round(s * rows * cols)
                k = round(total_prune * i2 / cols) - round(total_prune * i1 / cols)
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
                if k > 0:
                    saliency = (W1**2 / d.unsqueeze(0) ** 2).flatten()
                    mask1.view(-1)[torch.topk(saliency, k, largest=False).indices] = True
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)

            if fast:
                from .obs_triton import obs_block

                block_grid = None
                if grid is not None and (group_size == -1 or group_size % block_size == 0):
                    if group_size != -1 and i1 % group_size == 0:  # a group starts here: fit as the loop would
                        ahead = W[:, i2: i1 + group_size]
                        keep = torch.cat([~mask1, torch.ones_like(ahead, dtype=torch.bool)], 1)
                        grid.find_params(torch.cat([W1, ahead], dim=1), keep)
                        grids.append((grid.scale, grid.zero))
                    block_grid = (grid.scale, grid.zero)
                Q1, Err1, block_loss, block_grids = obs_block(
                    W1, U1, mask1 if nm is None else None, nm, block_grid,
                    grid.bits if grid is not None else None, group_size, grid.sym if grid is not None else False)
                grids.extend(block_grids)
                loss += 0.5 * block_loss
                count = 0  # the kernel did the columns
            for i in range(count):
                col = i1 + i
                w = W1[:, i]
                if nm is not None and i % nm[1] == 0:
                    span = W1[:, i: i + nm[1]] ** 2 / d[i: i + nm[1]].unsqueeze(0) ** 2
                    mask1.scatter_(1, i + torch.topk(span, min(nm[0], span.shape[1]), dim=1, largest=False).indices, True)
                q = w.clone()
                q[mask1[:, i]] = 0
                if grid is not None:
                    if group_size != -1 and col % group_size == 0:
                        ahead = W[:, i2: col + group_size]
                        group_w = torch.cat([W1[:, i: i + group_size], ahead], dim=1)
                        keep = torch.cat([~mask1[:, i: i + group_size], torch.ones_like(ahead, dtype=torch.bool)], 1)
                        grid.find_params(group_w, keep)
                        grids.append((grid.scale, grid.zero))
                    q = grid.quantize(q.unsqueeze(1)).squeeze(1)
                    q[mask1[:, i]] = 0
                Q1[:, i] = q
                err = (w - q) / d[i]
                loss += 0.5 * torch.sum(err**2)
                W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i1:i2] = Q1
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
        return W, float(loss), grids
