"""Loading a compact checkpoint through transformers: the load operation that rebuilds each dense weight.

transformers 5 groups the tensors of one parameter as the quantizer's ``serialized_names`` say (``weight`` and the
compact suffixes) and hands them to :class:`CompactDeserialize`, which decodes them with
:func:`.compact.decode_weight` (every tensor checked first). A decode error is caught by transformers, shown in its
load report as a ``CONVERSION`` row with our message naming the tensor, and the load then fails with transformers'
``RuntimeError`` ("We encountered some issues during automatic conversion of the weights"): a damaged or edited
checkpoint never loads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..obs.grid import set_module_grid
from ..pipeline.plan import is_transposed
from .compact import decode_weight


def _load_op_base():
    from transformers.core_model_loading import ConversionOps

    return ConversionOps


class CompactDeserialize(_load_op_base()):
    """transformers load operation: the compact tensors of one module (``weight_mask`` + values or codes/grid, and
    the empty ``weight`` placeholder) -> its dense ``weight`` in the model's dtype. A plain dense ``weight`` passes
    through unchanged."""

    def __init__(self, hf_quantizer: Any) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None,
                full_layer_name: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        tensors = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        if "weight_mask" not in tensors:
            return {"weight": tensors["weight"]}
        config = self.hf_quantizer.quantization_config
        module_name = full_layer_name.rpartition(".")[0]
        module = model.get_submodule(module_name)
        transposed = is_transposed(module)
        shape = tuple(module.weight.shape[::-1] if transposed else module.weight.shape)
        weight, grid = decode_weight(tensors, shape, module.weight.dtype, config.bits, config.group_size,
                                     config.sym, name=module_name)
        set_module_grid(module, grid)
        return {"weight": weight.t().contiguous() if transposed else weight}

    @property
    def reverse_op(self) -> Any:
        """Saving needs no reverse conversion: the quantizer's state dict already holds the compact tensors."""
        return _PassThrough()


class _PassThrough(_load_op_base()):
    def convert(self, input_dict: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return input_dict
