"""The compact tensors of one module decoded in torch for a forward (``run_compressed``): bit for bit
:func:`.compact.decode_weight`'s weight, in whole-tensor operations that run on all cores (CPU) or on the GPU, written
into buffers reused from one module to the next.

For a weight ``W`` ``[rows, cols]`` stored as a bitmask ``[rows, ⌈cols/8⌉]`` and the kept entries in row-major order
(values, or ``bits``-bit codes on ``(scale, zero)`` grids of ``group_size`` columns, :mod:`.compact`):

1. the mask, one byte per weight: each stored byte expands to its 8 bits through a ``[256, 8]`` table;
2. the place of every weight among the kept ones: ``k = (start[r] + cumsum_c mask[r, c]) · mask[r, c]`` (int32;
   ``start[r]`` is the number of kept weights before row ``r``, computed once per module: :class:`DecodePlan`), so
   ``k`` is the 1-based index of a kept weight in the stored order and 0 for a pruned one;
3. the kept values ``v[1..nnz]`` in the model dtype, ``v[0] = 0``: the stored values, or the codes dequantized —
   ``scale · (q − zero)`` in float32, cast once (:func:`..obs.grid.dequantize`'s expression) — each code on its own
   row's group (the group of every kept weight repeats its ``(row, group)`` as often as the group keeps weights, the
   counts read off the cumulative sums at the groups' last columns); for 4-bit codes through a 16-entry table per
   ``(row, group)``, which is the same arithmetic done once per code value;
4. ``W = v[k]``: one gather.

Work and memory per call: a few passes over ``rows · cols`` bytes and int32, and over the ``nnz`` kept weights; the
buffers (mask, indices, values, and the weight itself unless autograd needs it) are per thread and device, sized to
the largest module, so a model in a forward holds one decoded weight at a time. Nothing per weight is kept between
calls: the resident model stays as small as the compact checkpoint.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..obs.grid import column_groups
from .compact import unpack_codes

#: ``_BITS[b, i]``: bit ``i`` of byte ``b`` (the mask's little-endian bit order inside a byte)
_BITS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()
_POPCOUNT = _BITS.sum(1).to(torch.int32)
_local = threading.local()


def scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of ``numel`` elements reused across calls (this thread, ``device``): grown when too small,
    never shrunk. Its contents are whatever the last user left."""
    pool = _local.__dict__.setdefault("pool", {})
    key = (name, dtype, device)
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < numel:
        pool[key] = buffer = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


@dataclass(frozen=True)
class DecodePlan:
    """What the decoder keeps per module between calls (a few bytes per row): ``starts`` int32/int64 ``[rows, 1]``
    (kept weights before each row), ``nnz`` (kept weights), and the last column of each quantization group
    (``ends``, a ``[groups]`` index; None without codes)."""

    rows: int
    cols: int
    starts: torch.Tensor
    nnz: int
    ends: torch.Tensor | None

    @classmethod
    def of(cls, mask: torch.Tensor, cols: int, group_size: int | None) -> "DecodePlan":
        """The plan of a checked ``mask`` ``[rows, ⌈cols/8⌉]`` uint8; ``group_size`` None: values are stored."""
        rows = mask.shape[0]
        index = torch.int32 if rows * cols + 1 < 2**31 else torch.int64
        per_row = _POPCOUNT.to(mask.device)[mask.long()].sum(1)
        starts = (per_row.cumsum(0) - per_row).to(index).view(rows, 1)
        ends = None
        if group_size is not None:
            size = cols if group_size == -1 else group_size
            ends = (torch.arange(size, cols + size, size, device=mask.device).clamp(max=cols) - 1)
        return cls(rows, cols, starts, int(per_row.sum()), ends)

    def kept_index(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Steps 1-2: ``k`` ``[rows, cols]`` (a reused buffer) and, with groups, the kept count of every
        ``(row, group)`` in row-major order ``[rows · groups]`` int64."""
        rows, cols, stored = self.rows, self.cols, mask.shape[1]
        bits = scratch("mask", rows * stored * 8, torch.bool, mask.device).view(rows * stored, 8)
        stored_bytes = scratch("bytes", rows * stored, torch.int32, mask.device).copy_(mask.view(-1))
        torch.index_select(_bits_on(mask.device), 0, stored_bytes, out=bits)
        bits = bits.view(rows, stored * 8)[:, :cols]
        k = scratch("index", rows * cols, self.starts.dtype, mask.device).view(rows, cols)
        torch.cumsum(bits, 1, dtype=k.dtype, out=k)
        k.add_(self.starts)
        counts = None
        if self.ends is not None:
            last = k[:, self.ends]  # kept weights up to each group's end, the rows before included
            counts = torch.diff(last, dim=1, prepend=self.starts).reshape(-1).long()
        return k.mul_(bits), counts


def _bits_on(device: torch.device) -> torch.Tensor:
    cached = _local.__dict__.setdefault("bits", {})
    if device not in cached:
        cached[device] = _BITS.to(device)
    return cached[device]


def kept_values(plan: DecodePlan, counts: torch.Tensor | None, dtype: torch.dtype, values: torch.Tensor | None,
                codes: torch.Tensor | None, scale: torch.Tensor | None, zero: torch.Tensor | None,
                bits: int | None) -> torch.Tensor:
    """Step 3: ``v`` ``[nnz + 1]`` in ``dtype`` (a reused buffer), ``v[0] = 0``, ``v[1:]`` the kept weights."""
    device = values.device if values is not None else codes.device
    table = scratch("values", plan.nnz + 1, dtype, device)
    table[:1].zero_()
    if values is not None:
        table[1:].copy_(values)
        return table
    rows, groups = scale.shape
    s = scale.to(torch.float32).view(-1)
    z = torch.full_like(s, 2.0 ** (bits - 1)) if zero is None else \
        unpack_codes(zero, bits, rows * groups).to(torch.float32)
    q = unpack_codes(codes, bits, plan.nnz)
    if 2**bits * rows * groups < plan.nnz:  # a table per (row, group): one gather per kept weight
        levels = torch.arange(2**bits, dtype=torch.float32, device=device)
        lut = (s[:, None] * (levels - z[:, None])).to(dtype).view(-1)
        at = torch.repeat_interleave(torch.arange(0, rows * groups * 2**bits, 2**bits, device=device), counts,
                                     output_size=plan.nnz)
        torch.index_select(lut, 0, at.add_(q), out=table[1:])
    else:
        group = torch.repeat_interleave(torch.arange(rows * groups, device=device), counts, output_size=plan.nnz)
        table[1:].copy_(s[group] * (q.to(torch.float32) - z[group]))
    return table


def decode_into(plan: DecodePlan, mask: torch.Tensor, dtype: torch.dtype, values: torch.Tensor | None = None,
                codes: torch.Tensor | None = None, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                bits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight ``[rows, cols]`` in ``dtype`` of one module's checked compact tensors (``zero`` None: the
    symmetric zero point ``2^(bits-1)``), written into ``out`` (``rows · cols`` contiguous elements) or a new
    tensor. Bit for bit :func:`.compact.decode_weight`'s."""
    k, counts = plan.kept_index(mask)
    table = kept_values(plan, counts, dtype, values, codes, scale, zero, bits)
    if out is None:
        out = torch.empty(plan.rows * plan.cols, dtype=dtype, device=mask.device)
    torch.index_select(table, 0, k.view(-1), out=out.view(-1))
    return out.view(plan.rows, plan.cols)


def dense_codes(plan: DecodePlan, mask: torch.Tensor, codes: torch.Tensor, zero: torch.Tensor, bits: int,
                group_size: int) -> torch.Tensor:
    """The code of every weight (uint8 ``[rows, cols]``): a kept weight's stored code, a pruned weight's group zero
    point (``zero`` float32 ``[rows, groups]``), which decodes to 0 (:mod:`.int4_kernel`)."""
    k, _ = plan.kept_index(mask)
    table = torch.cat([codes.new_zeros(1), unpack_codes(codes, bits, plan.nnz)])
    kept = torch.index_select(table, 0, k.view(-1)).view(plan.rows, plan.cols)
    zeros = zero.to(torch.uint8)[:, column_groups(plan.cols, group_size, mask.device)]
    return torch.where(k == 0, zeros, kept)
