"""Loading a compact checkpoint through transformers: the load operation that rebuilds each dense weight.

transformers 5 groups the tensors of one parameter as the quantizer's ``serialized_names`` say (``weight`` and the
compact suffixes) and hands them to :class:`CompactDeserialize`, which decodes them with
:func:`.compact.decode_weight` (every tensor checked first). A decode error is caught by transformers, shown in its
load report as a ``CONVERSION`` row with our message naming the tensor, and the load then fails with transformers'
``RuntimeError`` ("We encountered some issues during automatic conversion of the weights"): a damaged or edited
checkpoint never loads.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol

import torch
from torch import nn

from ..obs.grid import Grid
from ..pipeline.plan import is_transposed
from .compact import SUFFIXES, check_compact_tensors, decode_weight
from .compressed_linear import CompressedLinear
from .spec import ExportSpec


class LoadingQuantizer(Protocol):
    """What the load operation reads from the quantizer loading the checkpoint (``SparseScheduleQuantizer``, or the
    copy of it transformers hands each operation): how the weights were stored."""

    export_spec: ExportSpec


#: attribute of a loading model: the names of the modules whose ``weight`` the checkpoint provided (checked, then
#: removed, once the load ends: :func:`check_all_loaded`)
LOADED_ATTR = "_sparse_schedule_loaded"


def check_all_loaded(model: nn.Module, compressed: Iterable[str]) -> None:
    """After a load: every ``compressed`` module's weight came from the checkpoint (else transformers initialised it
    at random); ``ValueError`` naming the first that did not."""
    loaded = model.__dict__.pop(LOADED_ATTR, set())
    missing = [name for name in compressed if name not in loaded]
    if missing:
        raise ValueError(f"checkpoint: the tensors of the compressed module {missing[0]} are missing "
                         f"({len(missing)} module(s) in all): its weight would be random; the checkpoint is damaged "
                         "and refused")


def loaded_grids(model: nn.Module) -> dict[str, Grid]:
    """Where the grids of a loading model go: its config's ``quantization_config.results.grids`` (the one config
    object the loaded model keeps; the quantizer an operation gets may be a copy)."""
    return model.config.quantization_config.results.grids


def _load_op_base():
    from transformers.core_model_loading import ConversionOps

    return ConversionOps


class CompactDeserialize(_load_op_base()):
    """transformers load operation: the compact tensors of one module (``weight_mask`` + values or codes/grid, and
    the empty ``weight`` placeholder) -> its dense ``weight`` in the model's dtype (decoded in float32, cast once), or,
    into a module kept compact (``run_compressed``, :mod:`.run_compressed`), the checked tensors as stored (values in
    the model's dtype). A plain dense ``weight`` passes through, cast to the model's dtype: this operation takes every
    ``weight`` of the checkpoint, and transformers casts nothing a quantizer's operation returns."""

    def __init__(self, hf_quantizer: LoadingQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model: nn.Module | None = None,
                full_layer_name: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        tensors = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        module_name = full_layer_name.rpartition(".")[0]
        model.__dict__.setdefault(LOADED_ATTR, set()).add(module_name)
        module = model.get_submodule(module_name)
        dtype = module.weight.dtype  # the model's (``dtype=`` of from_pretrained; "auto": config.json's)
        if "weight_mask" not in tensors:
            weight = tensors.get("weight")
            if weight is None or len(tensors) > 1:
                raise ValueError(f"{module_name}: the checkpoint holds {sorted(tensors)} for it: a compact weight "
                                 "needs weight_mask (a tensor is missing: the checkpoint is damaged)")
            return {"weight": weight.to(dtype) if weight.is_floating_point() else weight}
        spec = self.hf_quantizer.export_spec
        if isinstance(module, CompressedLinear):  # run_compressed: checked, then kept as stored
            check_compact_tensors(tensors, (module.out_features, module.in_features), spec.bits, spec.group_size,
                                  spec.sym, module_name)
            kept = {k: v.to(dtype) if k == "weight_values" else v for k, v in tensors.items() if k in SUFFIXES}
            return {"weight": torch.empty(0, dtype=dtype, device=tensors["weight_mask"].device), **kept}
        transposed = is_transposed(module)
        shape = tuple(module.weight.shape[::-1] if transposed else module.weight.shape)
        weight, grid = decode_weight(tensors, shape, dtype, spec.bits, spec.group_size, spec.sym, name=module_name)
        if grid is not None:
            loaded_grids(model)[module_name] = tuple(t.cpu() for t in grid)
        return {"weight": weight.t().contiguous() if transposed else weight}

    @property
    def reverse_op(self) -> Any:
        """Saving needs no reverse conversion: the quantizer's state dict already holds the compact tensors."""
        return _PassThrough()


class _PassThrough(_load_op_base()):
    def convert(self, input_dict: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return input_dict
