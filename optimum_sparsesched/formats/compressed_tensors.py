"""``export_format="compressed-tensors"``: the INT4/INT8 checkpoint in compressed-tensors' ``pack-quantized`` layout,
which plain transformers (with the ``compressed-tensors`` package) and vLLM load without this plugin.

For every compressed ``nn.Linear`` with grid ``(scale, zero)`` and codes ``q`` (:func:`.compact.grid_codes`):

- ``weight_packed`` int32 ``[rows, ⌈cols·bits/32⌉]``: the signed codes ``q - 2^(bits-1)`` packed densely along the
  input dimension (compressed-tensors' ``pack_to_int32``);
- ``weight_scale`` (model dtype) ``[rows, groups]``;
- ``weight_zero_point`` int32, the signed zero points ``zero - 2^(bits-1)`` packed along the output dimension
  (asymmetric grids only; a symmetric grid's signed zero point is 0);
- ``weight_shape`` int64 ``[2]`` = ``[rows, cols]``.

compressed-tensors dequantizes ``(q_signed - zero_signed) · scale`` = ``(q - zero) · scale``: the grid values the
OBS pass wrote, pruned weights included (their code is the zero point, so sparsity survives). ``config.json`` gets
a compressed-tensors ``quantization_config`` (``quant_method="compressed-tensors"``, ``format="pack-quantized"``,
one config group targeting ``Linear`` with every uncompressed Linear in ``ignore``); this package's own config is
kept alongside under ``sparse_schedule_config`` for the record (:mod:`..publish.writer` rewrites ``config.json``).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..obs.grid import Grid
from .compact import grid_codes
from .spec import ExportSpec

CT_EXTRA = 'pip install "optimum-sparsesched[compressed-tensors]"'


def _require_compressed_tensors() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"export_format='compressed-tensors' needs the compressed-tensors package: {CT_EXTRA}") from exc


def check_exportable(modules: dict[str, nn.Module]) -> None:
    """Before compressing: every module to compress must be an ``nn.Linear`` (compressed-tensors quantizes
    Linear layers only) and the package must be importable."""
    _require_compressed_tensors()
    others = [name for name, m in modules.items() if not isinstance(m, nn.Linear)]
    if others:
        raise ValueError(f"export_format: 'compressed-tensors' stores nn.Linear layers only; {others[0]} is a "
                         f"{type(modules[others[0]]).__name__}; allowed for this model: 'compact' | 'dense'")


def compressed_tensors_config(model: nn.Module, spec: ExportSpec, names: Iterable[str]) -> dict[str, Any]:
    """The ``quantization_config`` dict of the exported checkpoint whose compressed modules are ``names``
    (validated by compressed-tensors itself)."""
    _require_compressed_tensors()
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    compressed = set(names)
    ignore = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in compressed]
    grouped = spec.group_size != -1
    weights = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.sym,
                               strategy="group" if grouped else "channel",
                               group_size=spec.group_size if grouped else None, dynamic=False)
    ct = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                            format="pack-quantized", quantization_status="compressed", ignore=ignore)
    out = ct.model_dump(mode="json")
    out["quant_method"] = "compressed-tensors"
    return out


def compressed_tensors_module_tensors(name: str, weight: torch.Tensor, grid: Grid | None,
                                      spec: ExportSpec) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors (``{suffix: tensor}``, on the CPU) that replace compressed Linear ``name``'s
    ``weight`` ``[out, in]`` quantized on ``grid``."""
    _require_compressed_tensors()
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits, offset = spec.bits, 2 ** (spec.bits - 1)
    if grid is None:
        raise ValueError(f"export_format: 'compressed-tensors' needs the quantization grid of {name}, which this "
                         "model does not carry (compress it in this process, or load it from a 'compact' "
                         "checkpoint); save with export_format='dense' instead")
    scale, zero = grid
    w = weight.detach()
    codes = grid_codes(w, scale, zero, bits, spec.group_size)
    out = {"weight_packed": pack_to_int32((codes.to(torch.int16) - offset).to(torch.int8).cpu(), bits),
           "weight_scale": scale.to(w.dtype).cpu().contiguous()}
    if not spec.sym:
        signed_zero = (zero.to(torch.int16) - offset).to(torch.int8).cpu()
        out["weight_zero_point"] = pack_to_int32(signed_zero, bits, packed_dim=0).contiguous()
    out["weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
    return out
