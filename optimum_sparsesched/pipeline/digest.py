"""Content digests: of a model's weights, so that resume state is only ever applied to the weights it was made
from, and of files (:func:`files_sha256`, the one file hash of the package: calibration files, resume block files,
downloads).

:func:`parameters_digest` is a SHA-256 over the names, dtypes, shapes and bytes of some parameters (about 1 GB/s on
one CPU core with SHA extensions; ``benchmarks/RESULTS.md`` compares it with a block's compression time). The block
loop takes one per decoder block, before the block is compressed (:func:`block_digest`), and one of everything
outside the blocks (:func:`outside_digest`: embeddings, final norm, head); :mod:`.checkpoint` records and checks them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .offload import offloaded_tensors


def parameters_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 (hex) over the names, dtypes, shapes and bytes of ``named`` parameters; a parameter that does not live
    in CPU memory is copied there, one at a time."""
    h = hashlib.sha256()
    for name, p in named:
        t = p.detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        t = t.cpu().contiguous().reshape(-1)
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
    return h.hexdigest()


def block_digest(block: nn.Module) -> str:
    """:func:`parameters_digest` of one decoder block's parameters (names relative to the block)."""
    return parameters_digest(block.named_parameters())


def outside_digest(model: nn.Module, blocks: Iterable[nn.Module]) -> str:
    """:func:`parameters_digest` of the model's parameters outside the decoder ``blocks``; those accelerate
    offloaded (on ``meta``) are read from their weights maps, one at a time."""
    inside = {id(p) for b in blocks for p in b.parameters()}
    entries = offloaded_tensors(model)

    def value(name: str, p: torch.Tensor) -> torch.Tensor:
        if p.device.type != "meta":
            return p
        owner, _, attr = name.rpartition(".")
        entry = entries[(id(model.get_submodule(owner) if owner else model), attr)]
        return entry.hook.weights_map[entry.name]

    return parameters_digest((n, value(n, p)) for n, p in model.named_parameters() if id(p) not in inside)


def files_sha256(files: list[Path], root: Path) -> str:
    """SHA-256 (hex) of the bytes of ``files`` in order, each preceded by its path relative to ``root`` when there
    are several or it lies below ``root`` (so a folder's digest covers its files' names); one file directly in
    ``root``: the plain SHA-256 of its bytes."""
    h = hashlib.sha256()
    for f in files:
        if len(files) > 1 or f.parent != root:
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of one file's bytes, read in 1 MiB chunks."""
    path = Path(path)
    return files_sha256([path], path.parent)
