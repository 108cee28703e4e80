"""Optimisation-based layer solvers beside the SparseGPT scan: the exact refit of the kept weights
(``solver="refit"``) and an ADMM search of the support followed by that refit (``solver="admm"``, after ALPS, Meng
et al., NeurIPS 2024).

The layer objective is the scan's: with ``H_λ = H + λI`` the damped Hessian ``[cols, cols]`` (``H = 2XXᵀ/n``),

    L(Ŵ) = ½ tr((Ŵ − W) H_λ (Ŵ − W)ᵀ)        with the zeros of a mask M (bool [rows, cols], True = pruned).

Both solvers work in normalised coordinates: ``d = sqrt(diag H_λ)``, ``W̃ = W·diag(d)``, ``H̃ = diag(d)⁻¹ H_λ
diag(d)⁻¹`` (unit diagonal). There a weight's magnitude is its diagonal saliency ``|W_ij|·‖X_j‖`` and conjugate
gradients need no further preconditioner (the normalisation is Jacobi's).

**Refit** (fixed M). SparseGPT fixes each weight once, compensating only with the columns to its right; given the
final mask the least-squares optimum is different. Rows are independent: row ``r`` minimises
``(x − w̃_r) H̃ (x − w̃_r)ᵀ`` over ``x`` with ``x_M = 0``. Conjugate gradients on all rows at once (one
``[rows, cols] × [cols, cols]`` product per iteration), started from the scan's weights; the gradient
``(x − w̃) H̃`` is masked to the kept entries.

**ADMM** (support search). Split ``Ŵ = D`` with ``D`` in the sparsity set (unstructured: the ``round(s·rows·cols)``
smallest ``|·|`` of the layer are zero; N:M: the N smallest of every M consecutive inputs of a row)::

    W ← (W̃ H̃ + ρ (D − V)) (H̃ + ρI)⁻¹        (one eigendecomposition H̃ = QΛQᵀ serves every ρ)
    D ← Π(W + V)                              (keep the largest magnitudes)
    V ← V + W − D

with ``ρ`` growing geometrically from ``ρ₀``: while it is small the support moves freely toward the unconstrained
optimum, as it grows ``W`` and ``D`` are pulled together and the support freezes; the iterations stop once it has
not changed for :data:`ADMM_PATIENCE` iterations in a row. The support of the last ``D`` is refitted. With
``bits``, the refitted weights are then quantized by the GPTQ pass of the scan on that fixed support.

Per layer the result is kept only when its loss is below the SparseGPT scan's on the same damped Hessian; otherwise
the scan's result stands (:func:`.prune.prune` compares and records both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .columns import smallest_
from .inverse import InverseHessian
from .spec import PruneSpec

REFIT_ITERATIONS = 10  # conjugate-gradient steps: most of the refit's gain comes in the first five
ADMM_ITERATIONS = 20
ADMM_RHO0 = 0.1  # in units of the unit diagonal of H̃
ADMM_RHO_GROWTH = 1.45  # per iteration: ρ grows from 0.1 to ~170 over the iterations
#: iterations in a row without a change of the support after which the search ends: the support freezes as ρ grows
#: (on SmolLM2's layers at 0.7 after 7–10 iterations, ρ ≈ 1–3, and it never moved again in the remaining ones)
ADMM_PATIENCE = 2


@dataclass
class NormalizedLayer:
    """One layer in normalised coordinates: ``W`` = ``W̃`` ``[rows, cols]`` (dead inputs zeroed), ``H`` = ``H̃``
    ``[cols, cols]`` (unit diagonal), ``d`` ``[cols]`` the scale (``Ŵ = W̃·diag(d)⁻¹``)."""

    W: torch.Tensor
    H: torch.Tensor
    d: torch.Tensor

    @classmethod
    def of(cls, weight: torch.Tensor, inverse: InverseHessian) -> "NormalizedLayer":
        H, d = inverse.normalized()
        W = weight.to(torch.float32) * d[None, :]
        W[:, inverse.dead] = 0.0
        return cls(W, H, d)

    def to_weight(self, X: torch.Tensor) -> torch.Tensor:
        return X / self.d[None, :]

    def to_normalized(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.d[None, :]


def layer_loss(weight: torch.Tensor, candidate: torch.Tensor, H: torch.Tensor) -> float:
    """``½ tr((Ŵ − W) H (Ŵ − W)ᵀ)`` (the objective both solvers minimise, with ``H = H_λ``): the product in float32,
    the sum in float64."""
    delta = candidate.to(torch.float32) - weight.to(torch.float32)
    return 0.5 * float(((delta @ H.to(torch.float32)) * delta).sum(dtype=torch.float64))


def refit(layer: NormalizedLayer, mask: torch.Tensor, start: torch.Tensor,
          iterations: int = REFIT_ITERATIONS) -> torch.Tensor:
    """Conjugate gradients for ``min (X − W̃) H̃ (X − W̃)ᵀ`` with ``X[mask] = 0``, every row at once, from ``start``
    (normalised coordinates, ``[rows, cols]``). Returns ``X`` with exact zeros where ``mask``."""
    keep = ~mask
    X = start.masked_fill(mask, 0.0)
    R = ((layer.W - X) @ layer.H) * keep  # the negative gradient on the kept entries
    P = R.clone()
    rr = (R * R).sum(1)
    for _ in range(iterations):
        AP = (P @ layer.H) * keep
        curvature = (P * AP).sum(1)
        alpha = torch.where(curvature > 0, rr / curvature.clamp_min(1e-30), torch.zeros_like(rr))
        X = X + alpha[:, None] * P
        R = R - alpha[:, None] * AP
        rr_next = (R * R).sum(1)
        P = R + (rr_next / rr.clamp_min(1e-30))[:, None] * P
        rr = rr_next
    return X.masked_fill(mask, 0.0)


def project(Z: torch.Tensor, spec: PruneSpec) -> torch.Tensor:
    """The mask (True = pruned) of the projection onto the sparsity set: the smallest ``|Z|`` of the layer
    (unstructured: exactly ``k = round(s·rows·cols)`` of them, ties broken by position) or of every M consecutive
    inputs of a row (N:M)."""
    rows, cols = Z.shape
    magnitude = Z.abs()
    if spec.nm is None:
        mask = torch.zeros_like(Z, dtype=torch.bool)
        k = round(spec.sparsity * Z.numel())
        if k:  # the scan's selection rule (linear time on the CPU, unlike a top-k of this size)
            smallest_(mask.view(-1), magnitude.flatten(), k)
        return mask
    n, m = spec.nm
    groups = magnitude.view(rows, cols // m, m)
    chosen = torch.topk(groups, n, dim=2, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, chosen, True).view(rows, cols)


def admm_support(layer: NormalizedLayer, eig: tuple[torch.Tensor, torch.Tensor], spec: PruneSpec,
                 start: torch.Tensor, iterations: int = ADMM_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """The support found by ADMM with a growing penalty, started from ``start`` (normalised weights whose zeros
    are a feasible mask, e.g. SparseGPT's result). Returns ``(mask, D)``: the mask (True = pruned) and the last
    feasible iterate ``D`` (the refit's starting point)."""
    lam, Q = eig
    BQ = (layer.W @ layer.H) @ Q  # the constant part W̃H̃ of the W-update, in the eigenbasis
    D = start.clone()
    V = torch.zeros_like(D)
    mask = D == 0
    rho, unchanged = ADMM_RHO0, 0
    for _ in range(iterations):
        W = ((BQ + rho * ((D - V) @ Q)) / (lam + rho)[None, :]) @ Q.T
        moved = project(W + V, spec)
        unchanged = unchanged + 1 if torch.equal(moved, mask) else 0
        mask = moved
        D = (W + V).masked_fill(mask, 0.0)
        V = V + W - D
        rho *= ADMM_RHO_GROWTH
        if unchanged >= ADMM_PATIENCE:  # the support has frozen: the refit finishes from D
            break
    return mask, D


def candidate(weight: torch.Tensor, inverse: InverseHessian, spec: PruneSpec,
              scan_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unquantized candidate of ``spec.solver`` for ``weight`` ``[rows, cols]`` (float32, dead inputs zeroed):
    ``"refit"`` refits the kept weights of the SparseGPT scan's result ``scan_weight`` (unquantized, same mask);
    ``"admm"`` searches the support from there first. Returns ``(Ŵ, mask)`` (mask: True = pruned)."""
    layer = NormalizedLayer.of(weight, inverse)
    start = layer.to_normalized(scan_weight)
    mask = scan_weight == 0
    if spec.solver == "admm":
        mask, start = admm_support(layer, inverse.eigh(), spec, start)
    return layer.to_weight(refit(layer, mask, start)), mask
