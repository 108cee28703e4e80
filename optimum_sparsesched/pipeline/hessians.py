"""Hessian capture: ``H = 2 X Xᵀ / n`` of every compressible module's inputs, in float32, shared between modules
that read the same input.

Forward hooks see each module's input ``X`` (``[..., cols]``, every position one sample) while a decoder block
runs on the calibration windows. Modules fed the very same tensor — q/k/v after the attention norm, gate/up after
the MLP norm, OPT's q/k/v, fc1 — get one accumulator between them: the Hessian (and later its inverse) is computed
once, not once per module. Which modules share is read off the first window's forward (same storage, same shape),
and the groups come in the order the forward reaches them. The block runs inside its visit
(:class:`.sources.BlockVisit`), on the compute device; a pass whose outputs are not needed stops each window's
forward once every group has its input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..obs.inverse import all_finite
from .plan import weight_matrix
from .sources import BlockVisit


class HessianAccumulator:
    """Running ``H = 2/n Σ x xᵀ`` over calibration tokens, float32 ``[cols, cols]``.

    ``H`` is symmetric, so each batch updates only the row strips ``H[a:b, a:]`` on and above the diagonal (about
    ``(k+1)/2k`` of a full product's flops with ``k`` strips of ≈ :data:`STRIP` rows); the rest is mirrored from
    them when ``H`` is read. Each entry is the same dot product over the same samples as in one ``XᵀX``."""

    #: rows of a strip of ``H`` updated by one matrix product
    STRIP = 320

    def __init__(self, columns: int, device: torch.device | str, name: str = "") -> None:
        self._H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self._mirrored = True
        self.n = 0
        self.name = name

    @property
    def H(self) -> torch.Tensor:
        """The Hessian ``[cols, cols]``, its lower triangle mirrored from the upper one accumulated."""
        if not self._mirrored:
            self._H = torch.triu(self._H) + torch.triu(self._H, 1).mT
            self._mirrored = True
        return self._H

    @H.setter
    def H(self, value: torch.Tensor | None) -> None:
        self._H, self._mirrored = value, True

    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` ``[..., cols]`` (any leading shape: every position is one sample)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self._H.device, dtype=torch.float32)
        if not all_finite(x):
            raise FloatingPointError(
                f"{self.name or 'a module'}: non-finite calibration activations (NaN/Inf) at its input; the model "
                "overflows in its dtype on this text (try dtype=torch.float32) or its weights hold NaN/Inf")
        m, cols = x.shape
        self._H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5  # never in place: x may be the live activation
        strip = -(-cols // max(1, round(cols / self.STRIP)))
        for a in range(0, cols, strip):
            self._H[a:a + strip, a:].addmm_(x[:, a:a + strip].t(), x[:, a:])
        self._mirrored = False


class _GroupsSeen(Exception):
    """Raised by a hook to end a forward once every group has its input (the block's output is not needed)."""


@torch.no_grad()
def collect_block_hessians(visit: BlockVisit, hidden: list[torch.Tensor],
                           outputs: list[torch.Tensor] | None = None) -> dict[str, HessianAccumulator]:
    """Run the visited block on every window of ``hidden`` and return, per compressed module name (in the visit's
    order), the accumulator of its input Hessian: one shared object per group of modules reading the same input,
    the groups read off the first window's forward (same storage, same shape; in the order the forward reaches
    them). Inputs are taken by forward pre-hooks. With a list ``outputs`` the block's outputs are appended to it
    (stored where the inputs are); without, each window's forward ends as soon as every group has its input,
    before the last group's modules compute."""
    modules = visit.modules
    accumulators: dict[str, HessianAccumulator] = {}
    leaders: dict[str, HessianAccumulator] = {}  # the module of each group whose hook accumulates
    by_input: dict[Any, HessianAccumulator] = {}  # first window only: the input a group reads -> its accumulator
    alive: list[torch.Tensor] = []  # first window: inputs held so that no freed storage is reused under another
    seen: set[str] = set()

    def hook(name: str):
        def pre(_module, args) -> None:  # must return None: a value would replace the module's inputs
            x = args[0]
            if name not in accumulators:  # first window: group by the tensor read
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
                if key not in by_input:
                    by_input[key] = leaders[name] = HessianAccumulator(x.shape[-1], visit.device, name)
                    alive.append(x)
                accumulators[name] = by_input[key]
            acc = leaders.get(name)
            if acc is None:
                return
            acc.add_batch(x)
            seen.add(name)
            if outputs is None and len(seen) == len(leaders) and len(accumulators) == len(modules):
                raise _GroupsSeen
        return pre

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        for h in hidden:
            seen.clear()
            try:
                out = visit.forward(h)
            except _GroupsSeen:
                out = None
            alive.clear()
            for name in modules:  # modules the forward never calls: an accumulator each, never fed
                if name not in accumulators:
                    accumulators[name] = HessianAccumulator(weight_matrix(modules[name]).shape[1], visit.device, name)
            if outputs is not None:
                outputs.append(out.to(h.device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: accumulators[name] for name in modules}
