"""How compressed weights are stored: :class:`ExportSpec`, built once from the run's options."""

from __future__ import annotations

from dataclasses import dataclass

EXPORT_FORMATS = ("compact", "dense", "compressed-tensors")


@dataclass(frozen=True)
class ExportSpec:
    """``format``: ``"compact"`` (bitmask + values or packed codes, :mod:`.compact`), ``"dense"`` (plain weights with
    their zeros) or ``"compressed-tensors"`` (:mod:`.compressed_tensors`); the grid the weights were quantized on:
    ``bits`` (``None``: not quantized), ``group_size`` (``-1``: one group per row) and ``sym``."""

    format: str = "compact"
    bits: int | None = None
    group_size: int = 128
    sym: bool = False

