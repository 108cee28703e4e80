"""Per-block activation lists that grow with depth, kept in memory or spilled to a temporary folder.

The ``hessian`` schedule's damage measurement keeps one perturbed stream per block already passed (``k·L·p``
hidden states of ``p`` probe windows after block ``L``): memory that grows with depth. When the model's blocks
are offloaded or streamed (memory is the constraint), :class:`TensorLists` keeps each stream in a safetensors
file of a temporary folder (``tempfile``'s, i.e. ``TMPDIR``) instead, read back when the stream advances through
the next block and rewritten after it: the host then holds one stream at a time. Values are unchanged (files
store the exact bits). The folder is removed by :meth:`TensorLists.close` (also on errors, as a context manager).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class TensorLists:
    """A list of lists of tensors (``[i]`` reads list ``i``, ``[i] = tensors`` replaces it, ``append`` adds one),
    held in memory, or on disk with ``spill=True``."""

    def __init__(self, spill: bool = False) -> None:
        self._memory: list[list[torch.Tensor]] = []
        self._folder = Path(tempfile.mkdtemp(prefix="sparsesched-streams-")) if spill else None
        self._count = 0

    def __len__(self) -> int:
        return self._count if self._folder is not None else len(self._memory)

    def _path(self, i: int) -> Path:
        assert self._folder is not None
        return self._folder / f"{i:06d}.safetensors"

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        if self._folder is None:
            return self._memory[i]
        saved = load_file(str(self._path(i)))
        return [saved[str(j)] for j in range(len(saved))]

    def __setitem__(self, i: int, tensors: list[torch.Tensor]) -> None:
        if self._folder is None:
            self._memory[i] = tensors
            return
        save_file({str(j): t.detach().to("cpu").contiguous() for j, t in enumerate(tensors)}, str(self._path(i)))

    def append(self, tensors: list[torch.Tensor]) -> None:
        if self._folder is None:
            self._memory.append(tensors)
            return
        self._count += 1
        self[self._count - 1] = tensors

    def close(self) -> None:
        self._memory = []
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> "TensorLists":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
