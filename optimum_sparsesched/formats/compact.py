"""The compact on-disk format of a compressed checkpoint (``export_format="compact"``, the default): lossless.

Every compressed module's weight ``W`` ``[rows, cols]`` (``[out, in]``; GPT-2's Conv1D is transposed first) is
stored as

- ``weight_mask``  uint8 ``[rows, ⌈cols/8⌉]``: bit ``c % 8`` of byte ``c // 8`` is 1 where ``W[r, c] != 0``
  (little-endian bit order inside a byte);
- without quantization, ``weight_values`` (model dtype) ``[nnz]``: the nonzero entries in row-major order;
- with ``bits``-bit quantization, ``weight_codes`` uint8: the grid codes ``q`` of the nonzero entries in row-major
  order, packed two per byte for 4 bits (low nibble first) and one per byte for 8 bits; ``weight_scale`` bfloat16
  ``[rows, groups]`` and, for asymmetric grids, ``weight_zero`` uint8 ``[rows, groups]`` (packed like the codes),
  group ``j`` covering input columns ``j·group_size`` up to the next group (one group per row for
  ``group_size=-1``). A symmetric grid's zero point is ``2^(bits-1)`` and is not stored.

Decompression computes ``W[r, c] = scale[r, g] · (q - zero[r, g])`` in float32 and casts it to the model dtype —
exactly what the OBS pass wrote into the model — so a reloaded model is bit-identical to the one saved. At save
time the codes are read back from the weights (:func:`grid_codes`).

Sizes in bits per weight at sparsity ``s`` (``g`` = group size): ``1 + 16(1-s)`` unquantized (bf16) and
``1 + bits·(1-s) + (16 + bits)/g`` quantized asymmetric; 0.7 + INT4 with ``g = 128`` is ≈ 2.4 bits, 15% of bf16
(less in practice: kept weights that round to the zero point are stored as zeros).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..obs.grid import dequantize, module_grid, set_module_grid
from ..pipeline.plan import is_transposed, weight_matrix

SUFFIXES = ("weight_mask", "weight_values", "weight_codes", "weight_scale", "weight_zero")
_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` bool -> ``[rows, ⌈cols/8⌉]`` uint8, bit ``c % 8`` of byte ``c // 8``."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask
    return (padded.view(rows, -1, 8) * _BIT_WEIGHTS.to(mask.device)).sum(dim=2, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: ``[rows, ⌈cols/8⌉]`` uint8 -> ``[rows, cols]`` bool."""
    bits = packed.unsqueeze(2) & _BIT_WEIGHTS.to(packed.device)
    return (bits != 0).view(packed.shape[0], -1)[:, :cols]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``< 2^bits`` (any shape, flattened) -> uint8: two per byte (low nibble first) for 4 bits."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat
    if bits != 4:
        raise ValueError(f"bits: {bits} has no packed layout; allowed: 4, 8")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``count`` codes as uint8 ``[count]``."""
    if bits == 8:
        return packed[:count]
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:count]


def _column_groups(cols: int, group_size: int, device: torch.device) -> torch.Tensor:
    """Group index of every input column ``[cols]``: ``c // group_size``, all 0 for ``group_size=-1``."""
    if group_size == -1:
        return torch.zeros(cols, dtype=torch.long, device=device)
    return torch.arange(cols, device=device) // group_size


def grid_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               group_size: int) -> torch.Tensor:
    """The grid codes ``q`` (uint8 ``[rows, cols]``) of a weight written by the OBS pass, i.e. with
    ``weight == cast(scale · (q - zero))`` for every entry (zeros get ``q = zero``).

    ``q = round(w / scale) + zero``, checked by decompressing; where a 16-bit weight could not hold the float32
    grid value exactly (8-bit grids) the neighbouring code that reproduces it is taken. Raises ``ValueError`` if
    a weight is not on its grid (never written silently)."""
    w = weight.detach()
    rows, cols = w.shape
    g = _column_groups(cols, group_size, w.device)
    s = scale.to(w.device, torch.float32)[:, g]
    z = zero.to(w.device, torch.float32)[:, g]
    guess = torch.round(w.to(torch.float32) / s) + z
    codes = guess.clone()
    found = torch.zeros_like(w, dtype=torch.bool)
    for step in (0.0, -1.0, 1.0):
        candidate = (guess + step).clamp(0, 2**bits - 1)
        hit = ~found & (dequantize(candidate, s, z).to(w.dtype) == w)
        codes[hit] = candidate[hit]
        found |= hit
    if not bool(found.all()):
        bad = int((~found).sum())
        raise ValueError(f"{bad} weights are not on their {bits}-bit grid; save with export_format='dense'")
    return codes.to(torch.uint8)


def encode_weight(weight: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor] | None = None,
                  bits: int | None = None, group_size: int = -1, sym: bool = False) -> dict[str, torch.Tensor]:
    """The compact tensors of one weight ``[rows, cols]`` (``{suffix: tensor}``, see the module docstring).

    With ``grid`` = ``(scale, zero)`` float32 ``[rows, groups]`` and ``bits``, the nonzero weights are stored as
    codes (:func:`grid_codes`); without, as values."""
    w = weight.detach()
    mask = w != 0
    out = {"weight_mask": pack_mask(mask)}
    if grid is None:
        out["weight_values"] = w[mask].contiguous()
        return out
    scale, zero = grid
    out["weight_codes"] = pack_codes(grid_codes(w, scale, zero, bits, group_size)[mask], bits)
    out["weight_scale"] = scale.to(torch.bfloat16)
    if not sym:
        out["weight_zero"] = pack_codes(zero, bits)
    return out


def decode_weight(tensors: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype,
                  bits: int | None = None, group_size: int = -1, sym: bool = False) -> tuple[torch.Tensor, tuple | None]:
    """Rebuild ``W`` ``[rows, cols]`` in ``dtype`` from :func:`encode_weight`'s tensors; also returns the grid
    ``(scale, zero)`` (float32 ``[rows, groups]``) when the weight was quantized, else ``None``."""
    rows, cols = shape
    mask = unpack_mask(tensors["weight_mask"], cols)
    if mask.shape[0] != rows:
        raise ValueError(f"weight_mask has {mask.shape[0]} rows; the module has {rows}")
    weight = torch.zeros(rows, cols, dtype=dtype, device=mask.device)
    if "weight_values" in tensors:
        weight[mask] = tensors["weight_values"].to(dtype)
        return weight, None
    if bits is None:
        raise ValueError("the checkpoint stores quantization codes but its config has bits=None")
    scale = tensors["weight_scale"].to(torch.float32)
    groups = scale.shape[1]
    if sym:
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        zero = unpack_codes(tensors["weight_zero"], bits, rows * groups).to(torch.float32).view(rows, groups)
    rows_idx, cols_idx = mask.nonzero(as_tuple=True)
    g = _column_groups(cols, group_size, mask.device)[cols_idx]
    codes = unpack_codes(tensors["weight_codes"], bits, rows_idx.numel())
    weight[mask] = dequantize(codes, scale[rows_idx, g], zero[rows_idx, g]).to(dtype)
    return weight, (scale, zero)


def compact_module_tensors(module: nn.Module, config: Any) -> dict[str, torch.Tensor] | None:
    """The compact tensors (``{suffix: tensor}``, on the CPU) that replace a compressed module's ``weight``, or
    ``None`` when it stays dense: a module is stored compactly when its weight is quantized (it carries a grid) or
    when the mask and values are smaller than the dense weight."""
    grid = module_grid(module) if config.bits is not None else None
    w = weight_matrix(module)
    if grid is None:
        nnz = int((w != 0).sum())
        if nnz * w.element_size() + w.shape[0] * -(-w.shape[1] // 8) >= w.numel() * w.element_size():
            return None
    encoded = encode_weight(w, grid, config.bits, config.group_size, config.sym)
    return {suffix: t.cpu().contiguous() for suffix, t in encoded.items()}


def compact_state_dict(model: nn.Module, config: Any) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every compressed module's ``weight`` replaced by its compact tensors
    (:func:`compact_module_tensors`); other weights stay as they are."""
    state = model.state_dict()
    compressed = set(config.results.layer_sparsities)
    for name, module in model.named_modules():
        if name not in compressed or f"{name}.weight" not in state:
            continue
        encoded = compact_module_tensors(module, config)
        if encoded is None:
            continue
        del state[f"{name}.weight"]
        state.update({f"{name}.{suffix}": t for suffix, t in encoded.items()})
    return state


def _load_op_base():
    from transformers.core_model_loading import ConversionOps

    return ConversionOps


class CompactDeserialize(_load_op_base()):
    """transformers load operation: the compact tensors of one module (``weight_mask`` + values or codes/grid)
    -> its dense ``weight`` in the model's dtype. Other parameters (dense ``weight``) pass through unchanged."""

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
                                     config.sym)
        set_module_grid(module, grid)
        return {"weight": weight.t().contiguous() if transposed else weight}

    @property
    def reverse_op(self) -> Any:
        """Saving needs no reverse conversion: the quantizer's state dict already holds the compact tensors."""
        return _PassThrough()


class _PassThrough(_load_op_base()):
    def convert(self, input_dict: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        return input_dict
