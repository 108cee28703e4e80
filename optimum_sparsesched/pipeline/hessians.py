"""Hessian capture: ``H = 2 X Xᵀ / n`` of every compressible module's inputs, shared between modules that read the
same input.

Summation. Each window's product ``X_j X_jᵀ`` is computed in float32 and added into a float64 sum
``S = Σ_j X_j X_jᵀ``; ``H = 2 S / n`` is handed to the solvers in float32. Summed in float64, the float32 products
give the same float32 ``H`` whatever order the windows come in: under torch.distributed, where each rank sums its
own windows and the ranks' sums are added (:meth:`HessianAccumulator.reduced`), ``H`` is the single process's bit
for bit (a float64 sum of float32 products is exact while the products' exponents span fewer than ~22 binades, and
otherwise differs by ~1e-16, below float32's resolution). The solvers then see one Hessian whatever the launch: a
layer whose least-squares problem is ill-conditioned (``solver="refit"``/``"admm"``) would otherwise turn a one-ulp
difference of ``H`` into a visibly different layer, and the next blocks' masks into different masks.

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

from .blocks import BlockInputs, run_block
from .plan import weight_matrix


class HessianAccumulator:
    """``S = Σ x xᵀ`` over calibration tokens (float64 ``[cols, cols]``, each window's product in float32) and the
    token count ``n``; :attr:`H` is ``2 S / n`` in float32."""

    def __init__(self, columns: int, device: torch.device | str, name: str = "") -> None:
        self.S: torch.Tensor | None = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.n = 0
        self.name = name

    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` ``[..., cols]`` (any leading shape: every position is one sample)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.S.device, dtype=torch.float32)
        if not torch.isfinite(x).all():
            raise FloatingPointError(
                f"{self.name or 'a module'}: non-finite calibration activations (NaN/Inf) at its input; the model "
                "overflows in its dtype on this text (try dtype=torch.float32) or its weights hold NaN/Inf")
        self.S += x.t() @ x  # the float32 product, summed in float64 (see the module docstring)
        self.n += x.shape[0]

    @property
    def H(self) -> torch.Tensor | None:
        """``2 S / n`` ``[cols, cols]`` float32 (None once freed by ``H = None``)."""
        return None if self.S is None else self.S.to(torch.float32).mul_(2.0 / max(self.n, 1))

    @H.setter
    def H(self, value: None) -> None:
        if value is not None:
            raise ValueError("HessianAccumulator.H is computed from the sums; only None (free them) may be set")
        self.S = None

    def reduced(self, ctx: Any) -> torch.Tensor:
        """``H`` over every rank of ``ctx`` (a :class:`.distributed.DistributedContext`): the ranks' float64 sums and
        token counts added, then ``2 S / n``; frees this accumulator's sum."""
        S, self.S = self.S, None
        count = torch.tensor([float(self.n)], dtype=torch.float64, device=S.device)
        S, count = ctx.all_reduce_(S), ctx.all_reduce_(count)
        return S.to(torch.float32).mul_(2.0 / max(float(count.item()), 1.0))


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
    """Run block ``index`` on every window of ``hidden`` (default ``inputs.hidden``) and return, per module name,
    the accumulator of its input Hessian (one shared object per group of modules reading the same input; ``groups``
    when known, else read off a first forward). The block's outputs are appended to ``outputs`` (stored where the
    inputs are) when a list is given; with ``stop_early`` (no ``outputs``) each window's forward ends as soon as
    every group has its input."""
    assert not (stop_early and outputs is not None), "a stopped forward has no output"
    hidden = inputs.hidden if hidden is None else hidden
    groups = groups or input_groups(block, modules, inputs, index, device, hidden[0])
    accumulators: dict[str, HessianAccumulator] = {}
    handles = []
    seen: set[str] = set()

    def add(acc: HessianAccumulator):
        def hook(_module, args, _output) -> None:
            acc.add_batch(args[0])
            seen.add(acc.name)
            if stop_early and len(seen) == len(groups):
                raise _GroupsSeen
        return hook

    for group in groups:
        acc = HessianAccumulator(weight_matrix(modules[group[0]]).shape[1], device, group[0])
        accumulators.update({name: acc for name in group})
        handles.append(modules[group[0]].register_forward_hook(add(acc)))
    try:
        for h in hidden:
            seen.clear()
            try:
                out = run_block(block, h, inputs.args[index], inputs.kwargs[index], device, inputs.returns_tuple)
            except _GroupsSeen:
                continue
            if outputs is not None:
                outputs.append(out.to(h.device))
    finally:
        for handle in handles:
            handle.remove()
    return accumulators
