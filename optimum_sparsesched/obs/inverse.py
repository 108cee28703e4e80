"""The inverse Hessian as OBS needs it: the upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` (``H⁻¹ = UᵀU``).

Row ``q`` of ``U`` holds, up to the scale ``U_qq``, the inverse Hessian of the columns ``≥ q`` once the columns
before ``q`` are fixed (the successive Schur complements of ``H⁻¹``), so one factor serves every step of the
column scan and every row of ``W``. Dead inputs (``H_ii = 0``: the input is always zero) get ``H_ii = 1`` and their
weights are zeroed by the scan. Damping ``λ = damp · mean(diag H)`` is escalated ×10 while the factorisation fails.
All in float32.

``U`` is computed from one Cholesky factorisation and one triangular inverse, without forming ``H⁻¹``: with ``P``
the reversal of the columns, ``P H P = L Lᵀ`` (lower) gives ``H = Ū Ūᵀ`` with ``Ū = P L P`` upper, so
``H⁻¹ = Ū⁻ᵀ Ū⁻¹ = Uᵀ U`` with ``U = Ū⁻¹`` upper with a positive diagonal — the (unique) upper Cholesky factor of
``H⁻¹``. The reference computes the same factor as ``cholesky(cholesky_inverse(cholesky(H)), upper=True)``: the
same flops, without LAPACK's ``potri`` (behind ``cholesky_inverse``), which scales badly with threads on some CPUs
(576×576 on 2 threads here: 0.031 s against 0.042 s), and the direct factor is closer to the float64 one
(relative error 5e-8 against 8e-8 on SmolLM2's Hessians).
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

MAX_DAMP_ESCALATIONS = 8


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite: one reduction (a NaN/Inf makes the sum non-finite), and the exact
    elementwise check only when the sum is not finite (finite entries whose sum overflows)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def inverse_hessian_cholesky(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``, escalating λ ×10 on failure.

    Returns ``(U, λ used)``. ``H`` must already have its dead diagonal entries set to 1.
    """
    diag_mean = torch.mean(torch.diag(H)).item()
    lam = damp * diag_mean if diag_mean > 0 else damp
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for attempt in range(MAX_DAMP_ESCALATIONS + 1):
        L, info = torch.linalg.cholesky_ex((H + lam * eye).flip(0, 1))  # P (H + λI) P = L Lᵀ
        if info.item() == 0:
            U = torch.linalg.solve_triangular(L.flip(0, 1), eye, upper=True)  # (P L P)⁻¹
            if all_finite(U) and bool((torch.diag(U) > 0).all()):
                return U, lam
        logger.warning("Cholesky failed with damping %.3g (attempt %d); escalating x10", lam, attempt + 1)
        lam *= 10.0
    raise torch.linalg.LinAlgError(f"Hessian is not positive definite even with damping {lam / 10:.3g}")


class InverseHessian:
    """One Hessian ``H`` ``[cols, cols]`` prepared for OBS: dead inputs marked (``dead`` ``[cols]`` bool) and given
    ``H_ii = 1``, and the factor ``U`` computed once per damping level, then shared by every module that reads the
    same input (q/k/v, gate/up). The optimisation solvers (:mod:`.admm`) also share its damped, diagonally normalised
    form and that form's eigendecomposition (:meth:`normalized`, :meth:`eigh`)."""

    def __init__(self, H: torch.Tensor, damp: float) -> None:
        H = H.to(torch.float32).clone()
        self.dead = torch.diag(H) == 0
        H[self.dead, self.dead] = 1.0
        self.H = H
        self.damp = damp
        self._factors: dict[int, torch.Tensor] = {}
        self._damping: dict[int, float] = {}
        self._normalized: tuple[torch.Tensor, torch.Tensor] | None = None
        self._eigh: tuple[torch.Tensor, torch.Tensor] | None = None

    def factor(self, escalation: int = 0) -> torch.Tensor:
        """``U`` at damping ``damp · 10^escalation`` (further escalated inside if the Cholesky fails)."""
        if escalation not in self._factors:
            self._factors[escalation], self._damping[escalation] = inverse_hessian_cholesky(
                self.H, self.damp * 10.0**escalation)
        return self._factors[escalation]

    def damped(self, escalation: int = 0) -> torch.Tensor:
        """``H_λ = H + λI`` ``[cols, cols]`` with the ``λ`` that :meth:`factor` used at this escalation."""
        self.factor(escalation)
        return self.H + self._damping[escalation] * torch.eye(self.H.shape[0], device=self.H.device)

    def normalized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(H̃, d)``: ``d = sqrt(diag H_λ)`` ``[cols]`` and ``H̃ = diag(d)⁻¹ H_λ diag(d)⁻¹`` (unit diagonal)."""
        if self._normalized is None:
            H = self.damped()
            d = torch.sqrt(torch.diag(H))
            self._normalized = (H / d[:, None] / d[None, :], d)
        return self._normalized

    def eigh(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Λ, Q)`` with ``H̃ = Q diag(Λ) Qᵀ`` (float32). ADMM only solves with ``H̃ + ρI``, ``ρ ≥ 0.1`` against
        ``H̃``'s unit diagonal: a system float32 resolves, so no float64 factorisation (twice the time)."""
        if self._eigh is None:
            self._eigh = torch.linalg.eigh(self.normalized()[0])
        return self._eigh
