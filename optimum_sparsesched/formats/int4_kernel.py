"""``run_compressed="int4"``: a 4-bit compact Linear run by torch's CPU int4 matmul
(``aten._weight_int4pack_mm_for_cpu``, part of torch: nothing compiled by this package).

The compact format stores, for a weight ``W`` ``[rows, cols]``, the codes ``q`` of the kept weights on the grid
``(s, z)`` of their ``(row, group)`` (``group_size`` columns) and a bitmask; a pruned weight decodes to 0. The kernel
holds a 4-bit code for *every* weight, in its own packed layout ``[rows, cols/2]`` uint8, and per group of ``g``
columns (``g`` in 32, 64, 128, 256) and row a pair ``(S, Z)``; it computes ``y = x Wᵀ`` with

    ``W[n, k] = (Q[n, k] − 8) · S[k // g, n] + Z[k // g, n]``.

With ``Q`` the stored code where a weight is kept and ``z`` where it is pruned, ``S = s`` and ``Z = (8 − z) · s``,
this is ``s · (Q − z)``: the value :func:`.compact.decode_weight` computes in float32 before its cast to the model
dtype, 0 for a pruned weight. The kernel computes in the dtype of ``x`` and ``(S, Z)`` (:func:`kernel_dtype`):

- **bfloat16** for a bfloat16 model (on CPUs without native float32 int4 code paths the float32 kernel is several
  times slower than a dense matmul, the bfloat16 one faster). ``S = s`` is exact (the grid's scale is bfloat16);
  ``Z`` and the kernel's products are rounded to bfloat16, as the decoded bfloat16 model rounds ``W``: each weight
  within ``|8 − z| · s · 2⁻⁹ ≤ s / 64`` of its float32 value (a sixty-fourth of a quantization step), a pruned
  weight of an asymmetric grid within that of 0 (of a symmetric grid, ``Z = 0``: exactly 0);
- **float32** otherwise: ``s`` has an 8-bit significand and ``8 − z`` at most 4 bits, so both products and their
  sum are exact: the decoded model's float32 weights, pruned weights exactly 0 (a float16 model's input is cast to
  float32 and the output back).

Per weight in memory: 4 bits of code, the bitmask's 1 bit (kept for saving the checkpoint again) and
``64 / g`` bits of ``(S, Z)``, against the compact form's ``1 + 4 · density`` bits; the forward reads the codes
once, without decoding a dense weight. The codes are not stored a second time: :func:`kernel_codes` reads them back
through the kernel (a product with the identity, exact; ``cols² · rows`` multiply-adds), for a save or a decode.

Requirements: rows a multiple of 16; ``g`` dividing both ``cols`` and the grid's group (``group_size``, or
``cols`` per channel). A module that does not meet them stays in the compact form.
"""

from __future__ import annotations

import torch

from ..obs.grid import column_groups

#: the group sizes the kernel supports, largest first
KERNEL_GROUPS = (256, 128, 64, 32)
#: identity rows per kernel product when reading the codes back (``[chunk, cols]`` float32 at a time)
_READ_CHUNK = 1024


def kernel_available() -> bool:
    """Whether this torch has the CPU int4 matmul."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def kernel_group(rows: int, cols: int, group_size: int) -> int | None:
    """The kernel's group ``g`` for a ``[rows, cols]`` weight quantized in groups of ``group_size`` columns
    (``-1``: per channel): the largest of :data:`KERNEL_GROUPS` dividing ``cols`` and the group; None when there is
    none or ``rows`` is not a multiple of 16."""
    span = cols if group_size == -1 else group_size
    if rows % 16:
        return None
    return next((g for g in KERNEL_GROUPS if cols % g == 0 and span % g == 0), None)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[rows, cols]`` (integers 0..15) -> the kernel's packed layout (uint8 ``[rows, cols/2]``)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def scale_zero(scale: torch.Tensor, zero: torch.Tensor, cols: int, group_size: int, g: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The kernel's ``(S, Z)`` ``[cols/g, rows, 2]`` in ``dtype`` from the grid ``scale``, ``zero`` (float32
    ``[rows, groups]``): ``S = s``, ``Z = (8 − z) · s`` (computed in float32, then cast) of the grid group holding
    each kernel group."""
    grid_group = column_groups(cols, group_size, scale.device)[::g]  # [cols/g]
    s = scale[:, grid_group].t()
    return torch.stack([s, (8.0 - zero[:, grid_group].t()) * s], dim=-1).to(dtype).contiguous()


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel computes in for a model in ``dtype``: bfloat16 for bfloat16, else float32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def matmul(x: torch.Tensor, packed: torch.Tensor, g: int, sz: torch.Tensor) -> torch.Tensor:
    """``x Wᵀ`` ``[n, rows]`` in ``sz``'s dtype for ``x`` ``[n, cols]`` (any float dtype, cast to ``sz``'s)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(sz.dtype).contiguous(), packed, g, sz)


def kernel_codes(packed: torch.Tensor, g: int, rows: int, cols: int) -> torch.Tensor:
    """The codes ``Q`` (uint8 ``[rows, cols]``) of a packed weight, read back through the kernel: with ``S = 1``,
    ``Z = 8`` its weight is ``Q`` itself, and ``I Wᵀ = Qᵀ`` (small integers: exact in float32)."""
    unit = torch.stack([torch.ones(cols // g, rows), torch.full((cols // g, rows), 8.0)], dim=-1)
    out = torch.empty(cols, rows, dtype=torch.uint8)
    for start in range(0, cols, _READ_CHUNK):
        stop = min(cols, start + _READ_CHUNK)
        eye = torch.zeros(stop - start, cols)
        eye[:, start:stop].fill_diagonal_(1.0)
        out[start:stop] = matmul(eye, packed, g, unit).round_().to(torch.uint8)
    return out.t().contiguous()
