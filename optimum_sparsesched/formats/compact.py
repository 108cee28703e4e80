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

Nothing read back is trusted: before decoding, :func:`check_compact_tensors` checks every tensor of a module against
its mask (values/codes count = popcount), the module's shape and the config's ``bits``/``group_size``/``sym``
(scale/zero shapes, zero present iff asymmetric) and refuses non-finite values or scales, naming the tensor. The
options the tensors were encoded with are also recorded in every weight file (:mod:`.metadata`). Each compactly
stored module keeps an empty ``weight`` placeholder so that plain transformers (without this package) refuses the
checkpoint instead of loading random layers (:func:`.encode.encoded_state_dict`).

Sizes in bits per weight at sparsity ``s`` (``g`` = group size): ``1 + 16(1-s)`` unquantized (bf16) and
``1 + bits·(1-s) + (16 + bits)/g`` quantized asymmetric; 0.7 + INT4 with ``g = 128`` is ≈ 2.4 bits, 15% of bf16
(less in practice: kept weights that round to the zero point are stored as zeros).
"""

from __future__ import annotations


import torch
from torch import nn

from ..obs.grid import Grid, column_groups, dequantize, group_count
from ..pipeline.plan import weight_matrix
from .spec import ExportSpec

SUFFIXES = ("weight_mask", "weight_values", "weight_codes", "weight_scale", "weight_zero")
#: an empty tensor of every compact checkpoint, listed as an UNEXPECTED key by transformers loading it without this
#: package (this package ignores it)
REQUIRES_PLUGIN_KEY = "sparse_schedule.import_optimum_sparsesched_before_from_pretrained"
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


def grid_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               group_size: int) -> torch.Tensor:
    """The grid codes ``q`` (uint8 ``[rows, cols]``) of a weight written by the OBS pass, i.e. with
    ``weight == cast(scale · (q - zero))`` for every entry (zeros get ``q = zero``).

    ``q = round(w / scale) + zero``, checked by decompressing; where a 16-bit weight could not hold the float32
    grid value exactly (8-bit grids) the neighbouring code that reproduces it is taken. Raises ``ValueError`` if
    a weight is not on its grid (never written silently)."""
    w = weight.detach()
    rows, cols = w.shape
    g = column_groups(cols, group_size, w.device)
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


def _packed_length(count: int, bits: int) -> int:
    return count if bits == 8 else -(-count // 2)


def check_compact_tensors(tensors: dict[str, torch.Tensor], shape: tuple[int, int], bits: int | None,
                          group_size: int, sym: bool, name: str = "module") -> torch.Tensor:
    """Check one module's compact tensors against the module's ``shape`` ``(rows, cols)`` and the config's grid
    before anything is decoded; returns the unpacked mask ``[rows, cols]`` bool.

    Refused with a ``ValueError`` naming the tensor: a mask of the wrong dtype/shape or with bits set past the last
    column; not exactly one of ``weight_values``/``weight_codes``; a values count other than the mask's popcount, or
    non-finite values; codes without ``bits`` 4/8, a codes length other than the packed popcount; a scale that is not
    ``[rows, groups]`` (``groups`` from ``group_size``) or not finite; a ``weight_zero`` present with ``sym=True`` or
    missing with ``sym=False``, or of the wrong length; any other tensor."""
    rows, cols = shape
    packed = tensors.get("weight_mask")
    if packed is None or packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, -(-cols // 8)):
        got = "missing" if packed is None else f"{packed.dtype} {tuple(packed.shape)}"
        raise ValueError(f"{name}.weight_mask: expected uint8 {(rows, -(-cols // 8))} for a [{rows}, {cols}] "
                         f"weight, the checkpoint holds {got}")
    if cols % 8 and bool((packed[:, -1] >> (cols % 8)).any()):
        raise ValueError(f"{name}.weight_mask: bits set past column {cols}; the checkpoint is damaged")
    mask = unpack_mask(packed, cols)
    kept = int(mask.sum())
    stored = set(tensors) - {"weight"}  # ``weight``: the empty placeholder for plain transformers, see below
    values, codes = tensors.get("weight_values"), tensors.get("weight_codes")
    if (values is None) == (codes is None):
        raise ValueError(f"{name}: the checkpoint holds {sorted(stored)}; a compact weight needs weight_mask and "
                         "exactly one of weight_values / weight_codes")
    if values is not None:
        if stored != {"weight_mask", "weight_values"}:
            raise ValueError(f"{name}: unexpected {sorted(stored - {'weight_mask', 'weight_values'})} beside "
                             "weight_values (an unquantized compact weight stores weight_mask and weight_values only)")
        if values.dim() != 1 or values.numel() != kept or not values.is_floating_point():
            raise ValueError(f"{name}.weight_values: {values.dtype} {tuple(values.shape)}, but weight_mask marks "
                             f"{kept} kept weights (a 1-D float tensor of {kept} values is expected)")
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{name}.weight_values: holds NaN or Inf; the checkpoint is damaged")
        return mask
    if bits not in (4, 8):
        raise ValueError(f"{name}.weight_codes: the checkpoint stores quantization codes but config.json has "
                         f"bits={bits!r} (4 or 8 expected)")
    groups = group_count(cols, group_size)
    if codes.dtype != torch.uint8 or codes.dim() != 1 or codes.numel() != _packed_length(kept, bits):
        raise ValueError(f"{name}.weight_codes: {codes.dtype} {tuple(codes.shape)}, but {kept} kept weights at "
                         f"{bits} bits pack into uint8 ({_packed_length(kept, bits)},)")
    scale = tensors.get("weight_scale")
    if scale is None or tuple(scale.shape) != (rows, groups) or not scale.is_floating_point():
        got = "missing" if scale is None else f"{scale.dtype} {tuple(scale.shape)}"
        raise ValueError(f"{name}.weight_scale: expected a float ({rows}, {groups}) grid for group_size={group_size} "
                         f"over {cols} inputs, the checkpoint holds {got} (was group_size edited in config.json?)")
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{name}.weight_scale: holds NaN or Inf; the checkpoint is damaged")
    zero = tensors.get("weight_zero")
    if sym and zero is not None:
        raise ValueError(f"{name}.weight_zero: the checkpoint stores zero points but config.json has sym=True "
                         "(saved with sym=False?)")
    if not sym and (zero is None or zero.dtype != torch.uint8 or zero.dim() != 1
                    or zero.numel() != _packed_length(rows * groups, bits)):
        got = "missing" if zero is None else f"{zero.dtype} {tuple(zero.shape)}"
        raise ValueError(f"{name}.weight_zero: expected uint8 ({_packed_length(rows * groups, bits)},) for sym=False, "
                         f"the checkpoint holds {got} (was sym edited in config.json?)")
    extra = stored - {"weight_mask", "weight_codes", "weight_scale", "weight_zero"}
    if extra:
        raise ValueError(f"{name}: unexpected {sorted(extra)} beside weight_codes")
    return mask


def decode_weight(tensors: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype,
                  bits: int | None = None, group_size: int = -1, sym: bool = False,
                  name: str = "module") -> tuple[torch.Tensor, tuple | None]:
    """Rebuild ``W`` ``[rows, cols]`` in ``dtype`` from :func:`encode_weight`'s tensors, after
    :func:`check_compact_tensors` (``name`` is the module, for its errors); also returns the grid ``(scale, zero)``
    (float32 ``[rows, groups]``) when the weight was quantized, else ``None``."""
    rows, cols = shape
    mask = check_compact_tensors(tensors, shape, bits, group_size, sym, name)
    weight = torch.zeros(rows, cols, dtype=dtype, device=mask.device)
    if "weight_values" in tensors:
        weight[mask] = tensors["weight_values"].to(dtype)
        return weight, None
    scale = tensors["weight_scale"].to(torch.float32)
    groups = scale.shape[1]
    if sym:
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        zero = unpack_codes(tensors["weight_zero"], bits, rows * groups).to(torch.float32).view(rows, groups)
    rows_idx, cols_idx = mask.nonzero(as_tuple=True)
    g = column_groups(cols, group_size, mask.device)[cols_idx]
    codes = unpack_codes(tensors["weight_codes"], bits, rows_idx.numel())
    weight[mask] = dequantize(codes, scale[rows_idx, g], zero[rows_idx, g]).to(dtype)
    return weight, (scale, zero)


def compact_module_tensors(weight: torch.Tensor, grid: Grid | None, spec: ExportSpec) -> dict[str, torch.Tensor] | None:
    """The compact tensors (``{suffix: tensor}``, on the CPU, with the empty ``weight`` placeholder) that replace a
    compressed module's weight ``[out, in]``, or ``None`` when it stays dense: a module is stored compactly when its
    weight is quantized (``spec.bits`` and a ``grid``) or when the mask and values are smaller than the dense
    weight."""
    grid = grid if spec.bits is not None else None
    w = weight.detach()
    if grid is None:
        nnz = int((w != 0).sum())
        if nnz * w.element_size() + w.shape[0] * -(-w.shape[1] // 8) >= w.numel() * w.element_size():
            return None
    encoded = encode_weight(w, grid, spec.bits, spec.group_size, spec.sym)
    return {"weight": torch.empty(0, dtype=w.dtype), **{suffix: t.cpu().contiguous() for suffix, t in encoded.items()}}
