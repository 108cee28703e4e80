"""Safetensors shards written one tensor at a time, for checkpoints larger than memory.

transformers' ``save_pretrained`` serialises a whole shard (``max_shard_size``, 50 GB by default) from memory.
:class:`ShardWriter` instead streams each tensor to disk as it is added, so a checkpoint is written with one decoder
block in memory, whatever the shard size. The files are the safetensors format, written directly:

- 8 bytes: the header length ``N`` (little-endian u64); ``N`` bytes: a JSON header ``{"__metadata__": {...},
  name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, ...}``, padded with spaces so the data
  starts at a multiple of 8; then the tensors' bytes back to back (little-endian, row-major, no gaps).
- As in safetensors' own writer, tensors are laid out by decreasing element size (8, 4, 2, 1 bytes) so every
  tensor starts aligned to its element size: a shard's tensors go to one temporary file per element size, and
  :meth:`ShardWriter.finish` writes each shard's header (with the metadata known by then: the streaming path only
  knows the run's results digest when every block is done) and concatenates its parts behind it, one shard at a
  time (the extra disk space is one shard).

Shards fill up to ``max_shard_size`` bytes (a tensor larger than that gets a shard of its own) and are named as
transformers names them when :meth:`ShardWriter.finish` knows their number: ``model.safetensors`` for one,
``model-00001-of-0000N.safetensors`` and the ``model.safetensors.index.json`` weight map for several. Everything is
written inside ``folder`` (a temporary folder of the caller); nothing is renamed into a user's folder here.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import torch

from ..pipeline.sizes import parse_memory_size

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
          torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
ELEMENT_SIZES = (8, 4, 2, 1)


def shard_size_bytes(max_shard_size: int | str) -> int:
    """``max_shard_size`` as bytes (``"5GB"``, ``"500MB"``, ``"2GiB"`` or an int), as ``save_pretrained`` takes it."""
    try:
        size = parse_memory_size(max_shard_size)
    except ValueError:
        size = None
    if size is None:
        raise ValueError(f"max_shard_size: {max_shard_size!r} is not valid; allowed: a positive int number of bytes "
                         'or a string like "5GB", "500MB", "2GiB"')
    return size


class _OpenShard:
    def __init__(self, folder: Path, number: int, digest: Callable[[torch.Tensor], str] | None = None) -> None:
        self.path = folder / f".shard-{number:05d}.tmp"
        self.parts = {size: open(folder / f".shard-{number:05d}.{size}.tmp", "wb") for size in ELEMENT_SIZES}
        self.entries: dict[str, tuple[str, list[int], int, int, int]] = {}  # name -> dtype, shape, size, start, end
        self.bytes = 0
        self.digest = digest
        self.digests: dict[str, str] = {}  # name -> content digest, with ``digest``

    def add(self, name: str, tensor: torch.Tensor) -> None:
        dtype = DTYPES.get(tensor.dtype)
        if dtype is None:
            raise TypeError(f"{name}: dtype {tensor.dtype} has no safetensors name")
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        raw = t.view(torch.uint8).numpy() if t.numel() else b""
        f = self.parts[t.element_size()]
        start = f.tell()
        f.write(memoryview(raw))
        self.entries[name] = (dtype, list(tensor.shape), t.element_size(), start, f.tell())
        self.bytes += f.tell() - start
        if self.digest is not None:
            self.digests[name] = self.digest(tensor)

    def close(self) -> None:
        """No more tensors: close the temporary parts (the shard is assembled by :meth:`assemble`)."""
        for f in self.parts.values():
            f.close()

    def assemble(self, metadata: dict[str, str], digests_key: str | None = None) -> None:
        """Write the header (``metadata``, and under ``digests_key`` the JSON of this shard's tensor digests) and the
        tensors' bytes into ``self.path``; remove the temporary parts."""
        if digests_key is not None:
            metadata = {**metadata, digests_key: json.dumps(self.digests, separators=(",", ":"), sort_keys=True)}
        base, header = {}, {"__metadata__": metadata}
        offset = 0
        for size in ELEMENT_SIZES:
            base[size] = offset
            offset += os.path.getsize(self.parts[size].name)
        for name, (dtype, shape, size, start, end) in self.entries.items():
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [base[size] + start, base[size] + end]}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-(8 + len(encoded)) % 8)
        with open(self.path, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)))
            out.write(encoded)
            for size in ELEMENT_SIZES:
                with open(self.parts[size].name, "rb") as part:
                    shutil.copyfileobj(part, out, 16 * 2**20)
            out.flush()
            os.fsync(out.fileno())
        for f in self.parts.values():
            os.remove(f.name)

    def discard(self) -> None:
        for f in self.parts.values():
            f.close()
            if os.path.exists(f.name):
                os.remove(f.name)


class ShardWriter:
    """Write a checkpoint's tensors into safetensors shards in ``folder``, one tensor at a time (see the module
    docstring). ``metadata``: the ``__metadata__`` of every shard (``{"format": "pt"}`` is always included); with
    ``digests=(key, function)`` every shard also records ``function(tensor)`` of each of its tensors, as JSON under
    ``key``."""

    def __init__(self, folder: str | os.PathLike, max_shard_size: int | str = "50GB",
                 metadata: dict[str, str] | None = None,
                 digests: tuple[str, Callable[[torch.Tensor], str]] | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = shard_size_bytes(max_shard_size)
        self.metadata = {**(metadata or {}), "format": "pt"}
        self.digests = digests
        self.closed: list[_OpenShard] = []
        self.current: _OpenShard | None = None
        self.names: set[str] = set()
        self.total_size = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Append ``tensors`` (name -> tensor) to the checkpoint."""
        for name, tensor in tensors.items():
            if name in self.names:
                raise ValueError(f"tensor {name!r} written twice")
            self.names.add(name)
            size = tensor.numel() * tensor.element_size()
            if self.current is not None and self.current.entries and self.current.bytes + size > self.max_bytes:
                self._close_current()
            if self.current is None:
                self.current = _OpenShard(self.folder, len(self.closed) + 1, self.digests and self.digests[1])
            self.current.add(name, tensor)
            self.total_size += size

    def _close_current(self) -> None:
        assert self.current is not None
        self.current.close()
        self.closed.append(self.current)
        self.current = None

    def finish(self, total_parameters: int | None = None, metadata: dict[str, str] | None = None) -> list[str]:
        """Close the last shard, assemble every shard with its header (``metadata``, when given, replaces the
        constructor's ``__metadata__``; ``"format": "pt"`` is always included), give every shard its final name (and
        write the index when there are several). Returns the file names written, the index last."""
        if self.current is not None or not self.closed:
            if self.current is None:
                self.current = _OpenShard(self.folder, 1)
            self._close_current()
        if metadata is not None:
            self.metadata = {**metadata, "format": "pt"}
        for shard in self.closed:
            shard.assemble(self.metadata, self.digests and self.digests[0])
        count = len(self.closed)
        names = [SAFE_WEIGHTS_NAME] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors"
                                                       for i in range(1, count + 1)]
        weight_map: dict[str, str] = {}
        for shard, name in zip(self.closed, names):
            os.replace(shard.path, self.folder / name)
            weight_map.update(dict.fromkeys(shard.entries, name))
        if count == 1:
            return names
        metadata: dict[str, Any] = {"total_size": self.total_size}
        if total_parameters is not None:
            metadata = {"total_parameters": total_parameters, **metadata}
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names + [SAFE_WEIGHTS_INDEX_NAME]

    def discard(self) -> None:
        """Remove every temporary file (after a failure)."""
        if self.current is not None:
            self.current.discard()
            self.current = None
        for shard in self.closed:
            shard.discard()
            if shard.path.exists():
                os.remove(shard.path)
        self.closed = []
