"""GPTQ-style uniform integer grids used inside the OBS pass.

A grid maps a weight ``w`` of one output row to ``q = scale * (clamp(round(w / scale) + zero, 0, maxq) - zero)``
with ``maxq = 2**bits - 1``. Asymmetric grids span ``[min(w, 0), max(w, 0)]`` of the row (zero is always
representable, so pruned weights stay exactly 0); symmetric grids span ``[-a, a]``, ``a = max|w|``, with the zero
point in the middle. Parameters are found per row over a group of columns (``group_size``) or the whole row.

Scales are rounded up to the next bfloat16 when they are found (a relative change below 0.8%, float32's exponent
range; rounding up keeps ``[xmin, xmax]`` on the grid), so the grid a checkpoint stores in 16 bits reproduces the
in-memory weights bit for bit (:mod:`.compact`).
"""

from __future__ import annotations

import torch

#: the quantization grid of one module: ``(scale, zero)``, float32 ``[rows, groups]`` (group ``j`` covers the input
#: columns ``j·group_size …``; one group for ``group_size=-1``)
Grid = tuple[torch.Tensor, torch.Tensor]


def round_up_to_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 value ``>= x`` for positive finite float32 ``x`` (returned as float32): a bfloat16 is
    the upper 16 bits of a float32, so clear the lower 16 after adding ``0xFFFF`` to the bit pattern."""
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Grid values ``scale · (q - zero)`` in float32: the one expression the OBS pass and every stored format use,
    so a weight rebuilt from its codes is bit-identical to the one written."""
    return scale * (codes.to(torch.float32) - zero)


def column_groups(cols: int, group_size: int, device: torch.device | str) -> torch.Tensor:
    """Group index of every input column ``[cols]``: ``c // group_size``, all 0 for ``group_size=-1``."""
    if group_size == -1:
        return torch.zeros(cols, dtype=torch.long, device=device)
    return torch.arange(cols, device=device) // group_size


def group_count(cols: int, group_size: int) -> int:
    """Quantization groups per row of a weight with ``cols`` inputs: ``⌈cols / group_size⌉``, 1 for ``-1``."""
    return 1 if group_size == -1 else -(-cols // group_size)


def round_onto_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``w`` rounded to its nearest grid value ``scale · (clamp(round(w / scale) + zero, 0, maxq) - zero)``
    (``scale``, ``zero`` broadcast against ``w``), in float32."""
    return dequantize(torch.clamp(torch.round(w / scale) + zero, 0, maxq), scale, zero)


class QuantGrid:
    """Per-row grid parameters for ``bits``-bit quantization. Shapes: ``scale``, ``zero`` are ``[rows, 1]``."""

    def __init__(self, bits: int, sym: bool) -> None:
        self.bits = bits
        self.sym = sym
        self.maxq = 2**bits - 1
        self.scale: torch.Tensor | None = None
        self.zero: torch.Tensor | None = None

    def find_params(self, w: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Fit the grid to ``w`` ``[rows, cols]`` (float32); entries where ``keep`` is False are ignored."""
        if keep is not None:
            big = torch.finfo(w.dtype).max
            xmin = torch.where(keep, w, torch.full_like(w, big)).amin(dim=1)
            xmax = torch.where(keep, w, torch.full_like(w, -big)).amax(dim=1)
            empty = ~keep.any(dim=1)
            xmin = torch.where(empty, torch.zeros_like(xmin), xmin)
            xmax = torch.where(empty, torch.zeros_like(xmax), xmax)
        else:
            xmin, xmax = w.amin(dim=1), w.amax(dim=1)
        xmin = xmin.clamp(max=0)
        xmax = xmax.clamp(min=0)
        if self.sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        flat = (xmin == 0) & (xmax == 0)
        xmin = torch.where(flat, torch.full_like(xmin, -1.0), xmin)
        xmax = torch.where(flat, torch.full_like(xmax, 1.0), xmax)
        scale = round_up_to_bfloat16((xmax - xmin) / self.maxq)
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = torch.round(-xmin / scale).clamp(0, self.maxq)
        self.scale, self.zero = scale.unsqueeze(1), zero.unsqueeze(1)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """Round ``w`` ``[rows, k]`` onto the grid (returns dequantized float values)."""
        assert self.scale is not None and self.zero is not None, "find_params first"
        return round_onto_grid(w, self.scale, self.zero, self.maxq)
