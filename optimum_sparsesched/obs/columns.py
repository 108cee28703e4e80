"""The decisions both OBS scans (:mod:`.sparsegpt`, :mod:`.sparsegpt_triton`) make per column block, written once.

With ``W₁`` ``[rows, B]`` the block's columns and ``d = diag(U₁)`` (``U₁`` the block's part of the Cholesky factor
of ``H⁻¹``), the OBS saliency of a weight is ``w² / d²``:

- unstructured: at the block start, the ``k`` smallest saliencies of the whole block go, with ``k`` the block's
  share of the layer total ``round(s · rows · cols)`` (cumulative rounding, so the layer total is exact);
- N:M: when the scan reaches column ``i`` with ``i % M == 0``, the N smallest saliencies of columns ``i … i+M-1``
  of each row go (ties to the lower column);
- grids: at the start of a quantization group, the grid is fitted to the group's kept weights — its columns still
  in the block (after the updates so far) and those after the block (not yet updated).
"""

from __future__ import annotations

import numpy as np
import torch

from .grid import QuantGrid


def prune_count(total: int, i1: int, i2: int, cols: int) -> int:
    """Weights pruned in columns ``[i1, i2)`` so that the running total is ``round(total · i2 / cols)``."""
    return round(total * i2 / cols) - round(total * i1 / cols)


def unstructured_mask(W1: torch.Tensor, d: torch.Tensor, k: int) -> torch.Tensor:
    """Bool ``[rows, B]``: the ``k`` smallest saliencies ``W1² / d²`` of the block."""
    mask1 = torch.zeros_like(W1, dtype=torch.bool)
    if k > 0:
        saliency = (W1**2 / d.unsqueeze(0) ** 2).flatten()
        smallest_(mask1.view(-1), saliency, k)
    return mask1


def smallest_(mask: torch.Tensor, values: torch.Tensor, k: int) -> None:
    """Set in ``mask`` (bool, like ``values`` ``[n]``) the ``k`` smallest ``values`` (the one k-smallest rule of the
    scan and of ADMM's projection, :func:`.admm.project`). On the CPU through numpy's
    selection (``np.partition``: the ``k``-th smallest ``t``, then every value below ``t`` and the first of those
    equal to ``t`` in index order; ~60× faster than ``torch.topk`` on a 1536×128 block here), elsewhere (or when
    non-finite values make the selection short) ``torch.topk``'s."""
    if values.device.type == "cpu" and values.dtype in (torch.float32, torch.float64) and 0 < k <= values.numel():
        array = values.detach().contiguous().numpy()
        t = np.partition(array, k - 1)[k - 1]
        below = torch.from_numpy(array < t)
        ties = torch.from_numpy(array == t).nonzero().squeeze(1)[: k - int(below.sum())]
        if int(below.sum()) + ties.numel() == k:
            mask |= below
            mask[ties] = True
            return
    mask[torch.topk(values, k, largest=False).indices] = True


def mark_nm_(mask1: torch.Tensor, W1: torch.Tensor, d2: torch.Tensor, i: int, nm: tuple[int, int]) -> None:
    """Set in ``mask1`` the N smallest saliencies ``W1² / d²`` of columns ``i … i+M-1`` of every row (``d2`` = ``d²``
    ``[1, B]``, squared once per block)."""
    span = W1[:, i: i + nm[1]].square().div_(d2[:, i: i + nm[1]])
    mask1[:, i: i + nm[1]].scatter_(1, torch.topk(span, min(nm[0], span.shape[1]), dim=1, largest=False).indices, True)


def fit_group(grid: QuantGrid, W: torch.Tensor, W1: torch.Tensor, mask1: torch.Tensor, i: int, i1: int,
              group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``grid`` to the group that starts at column ``i1 + i``: ``W1[:, i:i+g]`` without the pruned entries, and
    the columns ``W[:, i2 : i1+i+g]`` after the block (``i2 = i1 + B``). Returns ``(scale, zero)`` ``[rows, 1]``."""
    i2 = i1 + W1.shape[1]
    ahead = W[:, i2: i1 + i + group_size]
    group_w = torch.cat([W1[:, i: i + group_size], ahead], dim=1)
    keep = torch.cat([~mask1[:, i: i + group_size], torch.ones_like(ahead, dtype=torch.bool)], 1)
    grid.find_params(group_w, keep)
    return grid.scale, grid.zero
