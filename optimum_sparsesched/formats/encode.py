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
from .compact import REQUIRES_PLUGIN_KEY, compact_module_tensors
from .spec import ExportSpec


def encode_module(name: str, module: nn.Module, grid: Grid | None, spec: ExportSpec) -> dict[str, torch.Tensor] | None:
    """The tensors (``{suffix: tensor}``, on the CPU) that replace compressed module ``name``'s ``weight`` (quantized
    on ``grid``) in ``spec.format``, or ``None`` when the weight is saved as it is."""
    if spec.format == "dense":
        return None
    if spec.format == "compressed-tensors":
        from .compressed_tensors import compressed_tensors_module_tensors

        return compressed_tensors_module_tensors(name, weight_matrix(module), grid, spec)
    return compact_module_tensors(weight_matrix(module), grid, spec)


def encode_state(state: dict[str, torch.Tensor], modules: dict[str, nn.Module], grids: dict[str, Grid],
                 spec: ExportSpec) -> bool:
    """Replace in ``state`` (tensors by qualified name) the ``weight`` of every module of ``modules`` (compressed
    modules by qualified name) by its encoding. Returns whether a module was stored in the compact format."""
    compact = False
    for name, module in modules.items():
        encoded = encode_module(name, module, grids.get(name), spec)
        if encoded is not None:
            del state[f"{name}.weight"]
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
