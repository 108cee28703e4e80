"""2:4 weights as PyTorch semi-structured sparse tensors, for the sparse tensor-core kernels of NVIDIA GPUs.

A model compressed with ``pattern="2:4"`` stores dense weights with at most 2 nonzeros in every 4 consecutive inputs
of each output row. :func:`to_semi_structured` replaces the weight of every such ``nn.Linear`` by
``torch.sparse.to_sparse_semi_structured(weight)`` (half the values plus 2-bit position metadata; its matmuls run
on cuSPARSELt, or CUTLASS when ``SparseSemiStructuredTensor._FORCE_CUTLASS`` is set); :func:`from_semi_structured`
turns them back into dense weights. Requirements of torch's kernels: a CUDA device, float16 or bfloat16 weights,
and both weight dimensions multiples of the backend's tile (16×16 for cuSPARSELt, 32×64 for CUTLASS in half
precision); a 2:4 ``nn.Linear`` whose shape does not fit stays dense and is logged. Values are unchanged: a round
trip gives back the same dense weights.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
#: Names of the converted modules, set on the model by :func:`to_semi_structured`.
CONVERTED_ATTR = "semi_structured_modules"


def is_2_4(weight: torch.Tensor) -> bool:
    """True when ``weight`` ``[rows, cols]`` has at most 2 nonzeros in every 4 consecutive input columns of every
    row (``cols`` a multiple of 4)."""
    if weight.dim() != 2 or weight.shape[1] % 4 or weight.numel() == 0:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def _sparse_class() -> type:
    from torch.sparse import SparseSemiStructuredTensor

    if SparseSemiStructuredTensor._FORCE_CUTLASS:
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def _fits_kernel_tiles(weight: torch.Tensor) -> bool:
    constraints = getattr(_sparse_class(), "_DTYPE_SHAPE_CONSTRAINTS", {}).get(weight.dtype)
    if constraints is None:
        return True  # let torch decide
    rows, cols = weight.shape
    return (rows >= constraints.sparse_min_rows and rows % constraints.sparse_min_rows == 0
            and cols >= constraints.sparse_min_cols and cols % constraints.sparse_min_cols == 0)


def two_four_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every dense ``nn.Linear`` of ``model`` whose weight has the 2:4 pattern, by qualified name."""
    from torch.sparse import SparseSemiStructuredTensor

    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m.weight, SparseSemiStructuredTensor) and is_2_4(m.weight)}


@torch.no_grad()
def to_semi_structured(model: nn.Module) -> nn.Module:
    """Convert, in place, the weight of every ``nn.Linear`` with a 2:4 pattern to a semi-structured sparse tensor.

    Checks every candidate before converting any: float16/bfloat16 weights (``ValueError`` naming the module and
    the dtype otherwise), a CUDA device (``RuntimeError`` when CUDA is unavailable or a weight is not on it).
    Raises ``ValueError`` when no ``nn.Linear`` has a 2:4 weight. The converted names are listed in
    ``model.semi_structured_modules``. Returns ``model``."""
    candidates = two_four_linears(model)
    if not candidates:
        raise ValueError("to_semi_structured: no nn.Linear weight of the model has the 2:4 pattern (at most 2 "
                         "nonzeros in every 4 consecutive inputs); compress with pattern='2:4' first")
    for name, m in candidates.items():
        if m.weight.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"to_semi_structured: {name}.weight is {m.weight.dtype}; semi-structured sparse kernels "
                             "need torch.float16 or torch.bfloat16 weights (e.g. model.half() or load with "
                             "dtype=torch.bfloat16)")
    if not torch.cuda.is_available():
        raise RuntimeError("to_semi_structured: needs a CUDA GPU (torch.sparse.to_sparse_semi_structured supports "
                           "CUDA tensors only, on sparse tensor cores: compute capability 8.0 or newer); CUDA is not "
                           "available in this torch/machine")
    for name, m in candidates.items():
        if not m.weight.is_cuda:
            raise RuntimeError(f"to_semi_structured: {name}.weight is on {m.weight.device}; semi-structured sparse "
                               "tensors need CUDA weights: move the model to the GPU first (model.cuda())")
    from torch.sparse import to_sparse_semi_structured

    converted = []
    for name, m in candidates.items():
        if not _fits_kernel_tiles(m.weight):
            logger.info("to_semi_structured: %s %s does not fit the kernel tiles; left dense", name,
                        tuple(m.weight.shape))
            continue
        m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach().contiguous()), requires_grad=False)
        converted.append(name)
    setattr(model, CONVERTED_ATTR, converted)
    return model


@torch.no_grad()
def from_semi_structured(model: nn.Module) -> nn.Module:
    """Turn every semi-structured sparse ``nn.Linear`` weight back into a dense one (same values), in place."""
    from torch.sparse import SparseSemiStructuredTensor

    for m in model.modules():
        if isinstance(m, nn.Linear) and isinstance(m.weight, SparseSemiStructuredTensor):
            m.weight = nn.Parameter(m.weight.to_dense(), requires_grad=False)
    if hasattr(model, CONVERTED_ATTR):
        delattr(model, CONVERTED_ATTR)
    return model
