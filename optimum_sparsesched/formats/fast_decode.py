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
   row's group (every kept weight's ``(row, group)`` index: a cumulative sum over marks set where each group's kept
   weights start, read off the cumulative sums of step 2 at the groups' last columns, :func:`group_of_kept`); for
   4-bit codes through a 16-entry table per ``(row, group)``, which is the same arithmetic done once per code value;
4. ``W = v[k]``: one gather.

Steps 1-4 run on row chunks of about :data:`DECODE_CHUNK` weights (rows are independent: the chunk ``[r₀, r₁)``
holds the kept weights ``starts[r₀] … starts[r₁] − 1``), so the mask, index and value buffers stay the size of a
chunk. Work and memory per call: a few passes over ``rows · cols`` int32, and over the ``nnz`` kept weights; every
step writes into buffers (per chunk, and the weight itself unless autograd needs it) reused per thread and device,
so a call allocates only its small per-group tables (a fresh multi-megabyte temporary per call leaves the C
allocator's heap holding freed memory in some processes and not others) and a model in a forward holds one decoded
weight at a time. Nothing per weight is kept between calls: the resident model
stays as small as the compact checkpoint.
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


#: weights per row chunk of the decoder: its buffers take ~8.5 bytes per weight and ~7 per kept one (≈ 11 MB at 30%
#: kept) instead of growing with the largest module (a 7B model's 11008×4096 MLP: ~480 MB); each chunk costs a few
#: small ops (~0.4 ms on a 2-core CPU), so modules up to 2²⁰ weights decode in one piece
DECODE_CHUNK = 2**20


@dataclass(frozen=True)
class DecodePlan:
    """What the decoder keeps per module between calls (a few bytes per row): ``starts`` int32/int64 ``[rows, 1]``
    (kept weights before each row), ``nnz`` (kept weights), the last column of each quantization group (``ends``, a
    ``[groups]`` index; None without codes) and the row chunks ``(r₀, r₁, a, b)``: rows ``[r₀, r₁)`` hold the kept
    weights ``[a, b)``."""

    rows: int
    cols: int
    starts: torch.Tensor
    nnz: int
    ends: torch.Tensor | None
    chunks: tuple[tuple[int, int, int, int], ...]

    @classmethod
    def of(cls, mask: torch.Tensor, cols: int, group_size: int | None, chunk: int = DECODE_CHUNK) -> "DecodePlan":
        """The plan of a checked ``mask`` ``[rows, ⌈cols/8⌉]`` uint8; ``group_size`` None: values are stored;
        ``chunk``: weights per row chunk (at least one row)."""
        rows = mask.shape[0]
        index = torch.int32 if rows * cols + 1 < 2**31 else torch.int64
        per_row = _POPCOUNT.to(mask.device)[mask.long()].sum(1)
        starts = (per_row.cumsum(0) - per_row).to(index).view(rows, 1)
        ends = None
        if group_size is not None:
            size = cols if group_size == -1 else group_size
            ends = (torch.arange(size, cols + size, size, device=mask.device).clamp(max=cols) - 1)
        step = max(1, chunk // max(cols, 1))
        bounds = list(range(0, rows, step)) + [rows]
        at = torch.cat([starts.view(-1), per_row.sum().view(1).to(index)])[bounds].tolist() if rows else [0]
        chunks = tuple((r0, r1, at[i], at[i + 1]) for i, (r0, r1) in enumerate(zip(bounds[:-1], bounds[1:])))
        return cls(rows, cols, starts, int(per_row.sum()), ends, chunks)

    def kept_index(self, mask: torch.Tensor, r0: int = 0, r1: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Steps 1-2 for rows ``[r0, r1)`` (default: all): ``k`` ``[r1 − r0, cols]`` (a reused buffer), the index
        among the kept weights from ``starts[r0]`` on, and, with groups, ``last`` ``[r1 − r0, groups]``: the kept
        weights up to each ``(row, group)``'s last column, the rows before included."""
        r1 = self.rows if r1 is None else r1
        rows, cols, stored = r1 - r0, self.cols, mask.shape[1]
        dtype = self.starts.dtype
        # in the index dtype, so that no step below converts (and allocates) a copy
        bits = scratch("mask", rows * stored * 8, dtype, mask.device).view(rows * stored, 8)
        stored_bytes = scratch("bytes", rows * stored, torch.int32, mask.device).copy_(mask[r0:r1].reshape(-1))
        torch.index_select(_bits_on(mask.device, dtype), 0, stored_bytes, out=bits)
        bits = bits.view(rows, stored * 8)[:, :cols]
        k = scratch("index", rows * cols, dtype, mask.device).view(rows, cols)
        torch.cumsum(bits, 1, dtype=dtype, out=k)
        k.add_(self.starts[r0:r1] - self.starts[r0] if r0 else self.starts[r0:r1])
        last = k[:, self.ends] if self.ends is not None else None
        return k.mul_(bits), last


def _bits_on(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    cached = _local.__dict__.setdefault("bits", {})
    if (device, dtype) not in cached:
        cached[device, dtype] = _BITS.to(device, dtype)
    return cached[device, dtype]


def group_of_kept(last: torch.Tensor, nnz: int, step: int) -> torch.Tensor:
    """``step · g`` for every kept weight (int32 ``[nnz]``, a reused buffer), ``g`` the row-major index of its
    ``(row, group)``: zeros with ``step`` added where each group after the first starts (``last``, the cumulative
    kept counts :meth:`DecodePlan.kept_index` returns), then a cumulative sum."""
    out = scratch("group", nnz + 1, torch.int32, last.device).zero_()
    starts = last.reshape(-1)[:-1].long()
    out.index_put_((starts,), torch.tensor(step, dtype=torch.int32, device=last.device), accumulate=True)
    return torch.cumsum(out, 0, dtype=out.dtype, out=out)[:nnz]


def kept_values(plan: DecodePlan, last: torch.Tensor | None, dtype: torch.dtype, values: torch.Tensor | None,
                codes: torch.Tensor | None, scale: torch.Tensor | None, zero: torch.Tensor | None,
                bits: int | None, nnz: int | None = None) -> torch.Tensor:
    """Step 3: ``v`` ``[nnz + 1]`` in ``dtype`` (a reused buffer), ``v[0] = 0``, ``v[1:]`` the kept weights:
    ``values`` ``[nnz]``, or the ``codes`` ``[nnz]`` (uint8, unpacked) on the grids ``scale`` ``[rows, groups]`` and
    ``zero`` (float32, same shape; None: symmetric) of the rows they belong to (``last``: see
    :func:`group_of_kept`)."""
    nnz = plan.nnz if nnz is None else nnz
    device = values.device if values is not None else codes.device
    table = scratch("values", nnz + 1, dtype, device)
    table[:1].zero_()
    if values is not None:
        table[1:].copy_(values)
        return table
    rows, groups = scale.shape
    s = scale.to(torch.float32).view(-1)
    z = torch.full_like(s, 2.0 ** (bits - 1)) if zero is None else zero.reshape(-1)
    if 2**bits * rows * groups < nnz:  # a table per (row, group): one gather per kept weight
        levels = torch.arange(2**bits, dtype=torch.float32, device=device)
        lut = (s[:, None] * (levels - z[:, None])).to(dtype).view(-1)
        torch.index_select(lut, 0, group_of_kept(last, nnz, 2**bits).add_(codes), out=table[1:])
    else:
        group = group_of_kept(last, nnz, 1)
        table[1:].copy_(s[group] * (codes.to(torch.float32) - z[group]))
    return table


def _codes_between(packed: torch.Tensor, bits: int, a: int, b: int) -> torch.Tensor:
    """The stored codes ``a … b − 1`` (uint8, a reused buffer) of ``packed`` (two 4-bit codes per byte, low nibble
    first)."""
    if bits == 8:
        return packed[a:b]
    part = packed[a // 2: (b + 1) // 2]
    pairs = scratch("codes", 2 * part.numel(), torch.uint8, packed.device).view(-1, 2)
    torch.bitwise_and(part, 0x0F, out=pairs[:, 0])
    torch.bitwise_right_shift(part, 4, out=pairs[:, 1])
    return pairs.view(-1)[a % 2: a % 2 + b - a]


def decode_into(plan: DecodePlan, mask: torch.Tensor, dtype: torch.dtype, values: torch.Tensor | None = None,
                codes: torch.Tensor | None = None, scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
                bits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight ``[rows, cols]`` in ``dtype`` of one module's checked compact tensors (``zero`` None: the
    symmetric zero point ``2^(bits-1)``), written into ``out`` (``rows · cols`` contiguous elements) or a new
    tensor, row chunk by row chunk (:attr:`DecodePlan.chunks`). Bit for bit :func:`.compact.decode_weight`'s."""
    if out is None:
        out = torch.empty(plan.rows * plan.cols, dtype=dtype, device=mask.device)
    weight = out.view(plan.rows, plan.cols)
    z = None
    if values is None and zero is not None:
        z = unpack_codes(zero, bits, scale.numel()).to(torch.float32).view(scale.shape)
    for r0, r1, a, b in plan.chunks:
        k, last = plan.kept_index(mask, r0, r1)
        if values is not None:
            table = kept_values(plan, last, dtype, values[a:b], None, None, None, bits, b - a)
        else:
            table = kept_values(plan, last, dtype, None, _codes_between(codes, bits, a, b), scale[r0:r1],
                                None if z is None else z[r0:r1], bits, b - a)
        torch.index_select(table, 0, k.view(-1), out=weight[r0:r1].view(-1))
    return weight


def dense_codes(plan: DecodePlan, mask: torch.Tensor, codes: torch.Tensor, zero: torch.Tensor, bits: int,
                group_size: int) -> torch.Tensor:
    """The code of every weight (uint8 ``[rows, cols]``): a kept weight's stored code, a pruned weight's group zero
    point (``zero`` float32 ``[rows, groups]``), which decodes to 0 (:mod:`.int4_kernel`)."""
    k, _ = plan.kept_index(mask)
    table = torch.cat([codes.new_zeros(1), unpack_codes(codes, bits, plan.nnz)])
    kept = torch.index_select(table, 0, k.view(-1)).view(plan.rows, plan.cols)
    zeros = zero.to(torch.uint8)[:, column_groups(plan.cols, group_size, mask.device)]
    return torch.where(k == 0, zeros, kept)
