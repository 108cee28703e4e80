"""Byte sizes: parsed from the options that take them (``max_device_memory``, ``max_shard_size``), counted from
tensors, and written for messages."""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch

MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MEMORY_FORMS = ('None, a positive int number of bytes, or a string like "2GiB", "512MB", "1.5GB" '
                "(units B, KB/MB/GB/TB = powers of 1000, KiB/MiB/GiB/TiB = powers of 1024)")


def parse_memory_size(value: Any, name: str = "max_device_memory") -> int | None:
    """A byte size: ``None``, a positive int, or ``"<number><unit>"`` (``"2GiB"``, ``"1.5GB"``); a ``ValueError``
    naming ``name`` otherwise."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in MEMORY_UNITS:
            size = int(float(match.group(1)) * MEMORY_UNITS[match.group(2).lower()])
            if size > 0:
                return size
    raise ValueError(f"SparseScheduleConfig: `{name}`={value!r} is not valid; allowed: {MEMORY_FORMS}.")


def format_bytes(n: int) -> str:
    """``1234567`` -> ``"1234567 bytes (1.18 MiB)"``."""
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n} bytes ({size:.3g} {unit})"


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages among ``tensors`` (a tensor shared by several blocks counts once)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
