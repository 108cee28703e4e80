"""Hessian capture: ``H = 2 X Xᵀ / n`` of every compressible module's inputs, in float32, shared between modules
that read the same input.

Forward hooks see each module's input ``X`` (``[..., cols]``, every position one sample) while a decoder block
runs on the calibration windows. Modules fed the very same tensor — q/k/v after the attention norm, gate/up after
the MLP norm, OPT's q/k/v, fc1 — get one accumulator between them: the Hessian (and later its inverse) is computed
once, not once per module. Which modules share is read off the first window's forward (same storage, same shape),
and the groups come in the order the forward reaches them (:func:`input_groups`). The block runs inside its visit
(:class:`.sources.BlockVisit`), on the compute device.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .plan import weight_matrix
from .sources import BlockVisit


class HessianAccumulator:
    """Running ``H = 2/n Σ x xᵀ`` over calibration tokens, float32 ``[cols, cols]``."""

    def __init__(self, columns: int, device: torch.device | str, name: str = "") -> None:
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.n = 0
        self.name = name

    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` ``[..., cols]`` (any leading shape: every position is one sample)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.H.device, dtype=torch.float32)
        if not torch.isfinite(x).all():
            raise FloatingPointError(
                f"{self.name or 'a module'}: non-finite calibration activations (NaN/Inf) at its input; the model "
                "overflows in its dtype on this text (try dtype=torch.float32) or its weights hold NaN/Inf")
        m = x.shape[0]
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5  # never in place: x may be the live activation
        self.H.addmm_(x.t(), x)


def input_groups(visit: BlockVisit, hidden: torch.Tensor) -> list[list[str]]:
    """The visited block's compressed modules grouped by the tensor they read, from one forward of ``hidden``
    through the block, in the order the forward reaches them (modules it never calls last, each alone)."""
    keys: dict[str, Any] = {}
    alive: list[torch.Tensor] = []  # held until grouping is done, so no freed storage is reused under another input

    def record(name: str):
        def hook(_module, args, _output) -> None:  # must return None: a value would replace the output
            if name not in keys:
                alive.append(args[0])
                keys[name] = (args[0].data_ptr(), tuple(args[0].shape), tuple(args[0].stride()))
        return hook

    handles = [m.register_forward_hook(record(name)) for name, m in visit.modules.items()]
    try:
        visit.forward(hidden)
    finally:
        for h in handles:
            h.remove()
    groups: dict[Any, list[str]] = {key: [] for key in keys.values()}  # in firing order
    for name in visit.modules:
        groups.setdefault(keys.get(name, ("unused", name)), []).append(name)
    return list(groups.values())


@torch.no_grad()
def collect_block_hessians(visit: BlockVisit, hidden: list[torch.Tensor],
                           outputs: list[torch.Tensor] | None = None) -> dict[str, HessianAccumulator]:
    """Run the visited block on every window of ``hidden`` and return, per compressed module name, the accumulator
    of its input Hessian (one shared object per group of modules reading the same input, :func:`input_groups`). The
    block's outputs are appended to ``outputs`` (stored where the inputs are) when a list is given."""
    accumulators: dict[str, HessianAccumulator] = {}
    handles = []

    def add(acc: HessianAccumulator):
        def hook(_module, args, _output) -> None:
            acc.add_batch(args[0])
        return hook

    for group in input_groups(visit, hidden[0]):
        module = visit.modules[group[0]]
        acc = HessianAccumulator(weight_matrix(module).shape[1], visit.device, group[0])
        accumulators.update({name: acc for name in group})
        handles.append(module.register_forward_hook(add(acc)))
    try:
        for h in hidden:
            out = visit.forward(h)
            if outputs is not None:
                outputs.append(out.to(h.device))
    finally:
        for handle in handles:
            handle.remove()
    return accumulators
