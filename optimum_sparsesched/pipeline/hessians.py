"""Hessian capture: ``H = 2 X Xᵀ / n`` of every compressible module's inputs, in float32, shared between modules
that read the same input.

Forward hooks see each module's input ``X`` (``[..., cols]``, every position one sample) while a decoder block
runs on the calibration windows. Modules fed the very same tensor — q/k/v after the attention norm, gate/up after
the MLP norm, OPT's q/k/v, fc1 — get one accumulator between them: the Hessian (and later its inverse) is computed
once, not once per module. Which modules share is read off the first window's forward (same storage, same shape),
and the groups come in the order the forward reaches them (:func:`input_groups`).

``true_sequential`` (as GPTQ's): each group is compressed before the next group's Hessian is collected, so
o_proj sees the compressed q/k/v, the MLP the compressed attention. Each of those collections stops the block's
forward as soon as the group's input has been seen (``stop_early``), so the forwards cost about one more block
forward per window, not one per group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..obs.inverse import all_finite
from .blocks import BlockInputs, run_block
from .plan import weight_matrix


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
    """Raised by a hook to end a forward once every accumulator has its input (``stop_early``)."""


def input_groups(block: nn.Module, modules: dict[str, nn.Module], inputs: BlockInputs, index: int,
                 device: torch.device | str, hidden: torch.Tensor) -> list[list[str]]:
    """Modules grouped by the tensor they read, from one forward of ``hidden`` through the block, in the order the
    forward reaches them (modules it never calls last, each alone)."""
    keys: dict[str, Any] = {}
    alive: list[torch.Tensor] = []  # held until grouping is done, so no freed storage is reused under another input

    def record(name: str):
        def hook(_module, args, _output) -> None:  # must return None: a value would replace the output
            if name not in keys:
                alive.append(args[0])
                keys[name] = (args[0].data_ptr(), tuple(args[0].shape), tuple(args[0].stride()))
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in modules.items()]
    try:
        run_block(block, hidden, inputs.args[index], inputs.kwargs[index], device, inputs.returns_tuple)
    finally:
        for h in handles:
            h.remove()
    groups: dict[Any, list[str]] = {key: [] for key in keys.values()}  # in firing order
    for name in modules:
        groups.setdefault(keys.get(name, ("unused", name)), []).append(name)
    return list(groups.values())


@torch.no_grad()
def collect_block_hessians(block: nn.Module, modules: dict[str, nn.Module], inputs: BlockInputs, index: int,
                           device: torch.device | str,
                           hidden: list[torch.Tensor] | None = None,
                           outputs: list[torch.Tensor] | None = None,
                           groups: list[list[str]] | None = None,
                           stop_early: bool = False) -> dict[str, HessianAccumulator]:
    """Run block ``index`` on every window of ``hidden`` (default ``inputs.hidden``) and return, per module name (in
    the order of ``modules``), the accumulator of its input Hessian (one shared object per group of modules reading
    the same input; ``groups`` when known, else read off the first window's forward as :func:`input_groups` does,
    without a forward of its own). The block's outputs are appended to ``outputs`` (stored where the inputs are)
    when a list is given; with ``stop_early`` (no ``outputs``) each window's forward ends as soon as every group has
    its input, before the last group's modules compute (inputs are taken by forward pre-hooks)."""
    assert not (stop_early and outputs is not None), "a stopped forward has no output"
    hidden = inputs.hidden if hidden is None else hidden
    accumulators: dict[str, HessianAccumulator] = {}
    leaders: dict[str, HessianAccumulator] = {}  # the module of each group whose hook accumulates
    by_input: dict[Any, HessianAccumulator] = {}  # first window only: the input a group reads -> its accumulator
    alive: list[torch.Tensor] = []  # first window: inputs held so that no freed storage is reused under another
    seen: set[str] = set()
    for group in groups or []:
        acc = HessianAccumulator(weight_matrix(modules[group[0]]).shape[1], device, group[0])
        accumulators.update({name: acc for name in group})
        leaders[group[0]] = acc

    def hook(name: str):
        def pre(_module, args) -> None:  # must return None: a value would replace the module's inputs
            x = args[0]
            if name not in accumulators:  # first window, groups not given: group by the tensor read
                key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
                if key not in by_input:
                    by_input[key] = leaders[name] = HessianAccumulator(x.shape[-1], device, name)
                    alive.append(x)
                accumulators[name] = by_input[key]
            acc = leaders.get(name)
            if acc is None:
                return
            acc.add_batch(x)
            seen.add(name)
            if stop_early and len(seen) == len(leaders) and len(accumulators) == len(modules):
                raise _GroupsSeen
        return pre

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()
               if groups is None or name in leaders]
    try:
        for h in hidden:
            seen.clear()
            try:
                out = run_block(block, h, inputs.args[index], inputs.kwargs[index], device, inputs.returns_tuple)
            except _GroupsSeen:
                out = None
            alive.clear()
            for name in modules:  # modules the forward never calls: an accumulator each, never fed
                if name not in accumulators:
                    accumulators[name] = HessianAccumulator(weight_matrix(modules[name]).shape[1], device, name)
            if outputs is not None:
                outputs.append(out.to(h.device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: accumulators[name] for name in modules}
