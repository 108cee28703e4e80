"""``prune(weight, hessian, spec)``: one layer's solve, behind which the scans (:mod:`.sparsegpt` in torch,
:mod:`.sparsegpt_triton` on CUDA) are interchangeable, and the optimisation solvers (:mod:`.admm`) refine the scan.

The weight is copied to float32 whatever the model dtype, its dead inputs (``H_ii = 0``) are zeroed, and the scan
runs with the Cholesky factor of the damped inverse Hessian; a result holding NaN/Inf is never returned — the scan
is retried with ×10 more damping, and after :data:`.inverse.MAX_DAMP_ESCALATIONS` failures a
``FloatingPointError`` is raised. With ``solver="refit"`` or ``"admm"`` the candidate of :mod:`.admm` (quantized on
its support by the scan's GPTQ pass when ``bits`` is set) replaces the scan's result only when its layer loss on
the same damped Hessian is lower; the result records both losses.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from . import admm, sparsegpt, sparsegpt_triton
from .inverse import MAX_DAMP_ESCALATIONS, InverseHessian, all_finite
from .spec import PruneResult, PruneSpec

logger = logging.getLogger(__name__)

#: environment variable read once at the start of a compression: the scan ``prune`` uses
KERNEL_ENV = "OPTIMUM_SPARSESCHED_OBS_KERNEL"
KERNELS = ("auto", "torch", "triton")
SOLVERS = ("sparsegpt", "refit", "admm")


def check_kernel(kernel: str, name: str = "kernel") -> str:
    """``kernel`` if it is one of :data:`KERNELS`, else a ``ValueError`` naming ``name``."""
    if kernel not in KERNELS:
        raise ValueError(f"{name}: {kernel!r} is not valid; allowed: " + " | ".join(repr(k) for k in KERNELS))
    return kernel


def choose_scan(kernel: str, device: torch.device, spec: PruneSpec):
    """The scan function for ``kernel``: ``"torch"``, ``"triton"`` (refused where it cannot run) or ``"auto"``
    (Triton where it can run, else torch)."""
    usable = sparsegpt_triton.available(device, spec)
    if check_kernel(kernel) == "triton" and not usable:
        raise ValueError("kernel: 'triton' needs the triton package and a CUDA tensor (or TRITON_INTERPRET=1), "
                         "and group_size a multiple or a divisor of block_size")
    return sparsegpt_triton.scan if usable and kernel != "torch" else sparsegpt.scan


def scan_with_damping(W: torch.Tensor, inverse: InverseHessian, spec: PruneSpec, scan,
                      mask: torch.Tensor | None = None) -> tuple[PruneResult, int]:
    """The scan at the lowest damping that gives finite weights: ``(result, escalation used)``."""
    for escalation in range(MAX_DAMP_ESCALATIONS):
        Q, loss, grids = scan(W, inverse.factor(escalation), spec, mask)
        if all_finite(Q):
            grid = (torch.cat([s for s, _ in grids], dim=1), torch.cat([z for _, z in grids], dim=1)) if grids else None
            return PruneResult(Q, loss, grid), escalation
        logger.warning("OBS produced non-finite weights; retrying with more damping")
    raise FloatingPointError("OBS pruning produced non-finite weights at every damping level")


@torch.no_grad()
def prune(weight: torch.Tensor, hessian: torch.Tensor | InverseHessian, spec: PruneSpec,
          kernel: str = "auto") -> PruneResult:
    """Prune (and quantize) ``weight`` ``[rows, cols]`` under ``spec`` given its Hessian (``[cols, cols]``, damped
    with ``spec.damp``, or an :class:`.InverseHessian` shared with other modules, which carries its own damping)."""
    W = weight.detach().to(torch.float32).clone().contiguous()
    inverse = hessian if isinstance(hessian, InverseHessian) else InverseHessian(hessian.to(W.device), spec.damp)
    W[:, inverse.dead] = 0.0
    scan = choose_scan(kernel, W.device, spec)
    result, escalation = scan_with_damping(W, inverse, spec, scan)
    if spec.solver == "sparsegpt":
        return result
    if spec.solver not in SOLVERS:
        raise ValueError(f"solver: {spec.solver!r} is not valid; allowed: " + " | ".join(map(repr, SOLVERS)))
    start = result if spec.bits is None else scan_with_damping(W, inverse, dataclasses.replace(spec, bits=None),
                                                                 scan)[0]
    candidate, mask = admm.candidate(W, inverse, spec, start.weight)
    grid = None
    if spec.bits is not None and torch.isfinite(candidate).all():
        quantized, _ = scan_with_damping(candidate, inverse, spec, scan, mask=mask)
        candidate, grid = quantized.weight, quantized.grid
    H = inverse.damped(escalation)
    baseline = admm.layer_loss(W, result.weight, H)
    loss = admm.layer_loss(W, candidate, H) if torch.isfinite(candidate).all() else float("inf")
    if loss < baseline:
        return PruneResult(candidate, loss, grid, sparsegpt_loss=baseline, solver=spec.solver)
    return PruneResult(result.weight, baseline, result.grid, sparsegpt_loss=baseline)
