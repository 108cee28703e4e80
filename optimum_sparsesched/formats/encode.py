"""A compressed module's weight as it is stored, in the run's export format: one encoding for every writer.

:func:`encode_module` gives the tensors that replace one compressed module's ``weight`` — the compact tensors
(:mod:`.compact`), the pack-quantized ones (:mod:`.compressed_tensors`) or nothing (``"dense"``: the weight is saved
as it is). The checkpoint writer (:mod:`..publish.writer`) encodes block by block with it, and
:func:`encoded_state_dict` encodes a whole model in memory with it (the quantizer's state dict for a plain
``type(model).save_pretrained``), so both write the same tensors.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..obs.grid import Grid
from ..pipeline.plan import weight_matrix
from .compact import REQUIRES_PLUGIN_KEY, SUFFIXES, compact_module_tensors
from .compressed_linear import CompressedLinear
from .spec import ExportSpec


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A compressed module's weight matrix ``[out, in]``: a view of its parameter, or decoded for a module kept
    compact in memory (:class:`.compressed_linear.CompressedLinear`)."""
    return module.decode() if isinstance(module, CompressedLinear) else weight_matrix(module)


def encode_module(name: str, module: nn.Module, grid: Grid | None, spec: ExportSpec) -> dict[str, torch.Tensor] | None:
    """The tensors (``{suffix: tensor}``, on the CPU) that replace compressed module ``name``'s ``weight`` (quantized
    on ``grid``) in ``spec.format``, or ``None`` when the weight is saved as it is. A module kept compact in memory
    gives its own tensors (``"compact"``: the checkpoint it was loaded from, tensor for tensor), else its decoded
    weight (``"dense"``: in the module's own layout) and grid."""
    compact = isinstance(module, CompressedLinear)
    if spec.format == "dense":
        if not compact:
            return None
        w = module.decode()
        return {"weight": (w.t().contiguous() if module.transposed else w).cpu()}
    if spec.format == "compressed-tensors":
        from .compressed_tensors import compressed_tensors_module_tensors

        return compressed_tensors_module_tensors(name, dense_weight(module), module.grid() if compact else grid, spec)
    return module.compact_tensors() if compact else compact_module_tensors(weight_matrix(module), grid, spec)


def encode_state(state: dict[str, torch.Tensor], modules: dict[str, nn.Module], grids: dict[str, Grid],
                 spec: ExportSpec) -> bool:
    """Replace in ``state`` (tensors by qualified name) the ``weight`` of every module of ``modules`` (compressed
    modules by qualified name) by its encoding. Returns whether a module was stored in the compact format."""
    compact = False
    for name, module in modules.items():
        encoded = encode_module(name, module, grids.get(name), spec)
        if encoded is not None:
            for suffix in ("weight", *SUFFIXES):  # a module kept compact holds the compact tensors in the state
                state.pop(f"{name}.{suffix}", None)
            state.update({f"{name}.{suffix}": t for suffix, t in encoded.items()})
            compact = compact or "weight_mask" in encoded
    return compact


def encoded_state_dict(model: nn.Module, spec: ExportSpec, names: Iterable[str],
                       grids: dict[str, Grid]) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every compressed module's ``weight`` (``names``, with their ``grids``) encoded.
    A compactly stored module keeps an empty ``weight`` placeholder (shape ``[0]``) and the state dict one empty
    :data:`.compact.REQUIRES_PLUGIN_KEY` tensor: loaded without this package, transformers finds every compressed
    ``weight`` with the wrong shape and refuses to load (instead of initialising those layers at random), and its
    load report lists the key that says what to do."""
    state = model.state_dict()
    if encode_state(state, {n: model.get_submodule(n) for n in names}, grids, spec):
        state[REQUIRES_PLUGIN_KEY] = torch.empty(0, dtype=torch.uint8)
    return state
