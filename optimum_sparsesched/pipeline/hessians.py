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

Forward pre-hooks see each module's input ``X`` (``[..., cols]``, every position one sample) while a decoder block
runs on the calibration windows. Modules fed the very same tensor — q/k/v after the attention norm, gate/up after
the MLP norm, OPT's q/k/v, fc1 — get one accumulator between them: the Hessian (and later its inverse) is computed
once, not once per module. Which modules share is read off the first window's forward (same storage, same shape).
The block runs inside its visit (:class:`.sources.BlockVisit`), on the compute device; a pass whose outputs are not
needed stops each window's forward once every group has its input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..obs.inverse import all_finite
from .plan import weight_matrix
from .sources import BlockVisit


class HessianAccumulator:
    """``S = Σ x xᵀ`` over calibration tokens and the token count ``n``; :attr:`H` is ``2 S / n`` in float32.

    Each window's product is computed in float32 and added into a float64 ``S`` (see the module docstring), and only
    its row strips ``S[a:b, a:]`` on and above the diagonal are computed (about ``(k+1)/2k`` of a full product's
    flops with ``k`` strips of ≈ :data:`STRIP` rows); the lower triangle is mirrored when ``H`` is read."""

    #: rows of a strip of ``S`` computed by one matrix product
    STRIP = 320

    def __init__(self, columns: int, device: torch.device | str, name: str = "") -> None:
        self.S: torch.Tensor | None = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.n = 0
        self.name = name

    def add_batch(self, x: torch.Tensor) -> None:
        """Add inputs ``x`` ``[..., cols]`` (any leading shape: every position is one sample)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(device=self.S.device, dtype=torch.float32)
        if not all_finite(x):
            raise FloatingPointError(
                f"{self.name or 'a module'}: non-finite calibration activations (NaN/Inf) at its input; the model "
                "overflows in its dtype on this text (try dtype=torch.float32) or its weights hold NaN/Inf")
        cols = x.shape[1]
        strip = -(-cols // max(1, round(cols / self.STRIP)))
        for a in range(0, cols, strip):  # the float32 product of each strip, summed in float64
            self.S[a:a + strip, a:] += x[:, a:a + strip].t() @ x[:, a:]
        self.n += x.shape[0]

    @staticmethod
    def _hessian(S: torch.Tensor, n: float) -> torch.Tensor:
        return (torch.triu(S) + torch.triu(S, 1).mT).to(torch.float32).mul_(2.0 / max(n, 1.0))

    @property
    def H(self) -> torch.Tensor | None:
        """``2 S / n`` ``[cols, cols]`` float32, its lower triangle mirrored (None once freed by ``H = None``)."""
        return None if self.S is None else self._hessian(self.S, self.n)

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
        return self._hessian(S, float(count.item()))


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
