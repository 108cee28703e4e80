"""What one OBS solve is asked to do (:class:`PruneSpec`) and what it returns (:class:`PruneResult`)."""

from __future__ import annotations

from dataclasses import dataclass
import torch


@dataclass(frozen=True)
class PruneSpec:
    """The options of one layer's OBS pass.

    ``sparsity``: fraction of the layer's weights set to zero (exactly ``round(sparsity · rows · cols)`` for
    unstructured masks); ``nm``: ``(N, M)`` = N zeros in every M consecutive inputs of each row, or ``None``;
    ``bits``: quantize the kept weights onto a ``bits``-bit grid in the same pass (``None``: no quantization);
    ``group_size``: grid group length along the inputs (``-1``: one grid per row); ``sym``: symmetric grid;
    ``block_size``: OBS column block (lazy updates, adaptive unstructured masks); ``damp``: Hessian damping as a
    fraction of ``mean(diag H)``; ``solver``: ``"sparsegpt"`` (the OBS scan), ``"refit"`` (the scan's mask, kept
    weights refitted exactly) or ``"admm"`` (the mask searched by ADMM, kept weights refitted), see :mod:`.admm`."""

    sparsity: float
    nm: tuple[int, int] | None = None
    bits: int | None = None
    group_size: int = 128
    sym: bool = False
    block_size: int = 128
    damp: float = 0.01
    solver: str = "sparsegpt"


@dataclass
class PruneResult:
    """``weight``: the pruned (and quantized) matrix, float32 ``[rows, cols]``; ``loss``: the layer loss
    ``½ tr((Ŵ − W) H_λ (Ŵ − W)ᵀ)`` with the damped Hessian ``H_λ`` (for the SparseGPT scan this is its OBS estimate
    ``½ Σ e²`` accumulated over the columns, which equals it); ``grid``: with ``bits``, the grids used,
    ``(scale, zero)`` float32 ``[rows, groups]`` (group ``j`` covers columns ``j·group_size …``; one group for
    ``group_size=-1``), else ``None``; ``sparsegpt_loss``: when another solver ran, the SparseGPT scan's loss on the
    same Hessian (the result is the scan's own when it was not above it); ``solver``: what produced ``weight``."""

    weight: torch.Tensor
    loss: float
    grid: tuple[torch.Tensor, torch.Tensor] | None = None
    sparsegpt_loss: float | None = None
    solver: str = "sparsegpt"
