"""The optimisation solvers (obs/admm.py): the refit is the exact least-squares optimum of a fixed mask, ADMM finds
the brute-force optimal support of tiny layers, and per layer neither ever ends above the SparseGPT scan's loss
(unstructured, N:M, INT4)."""

import dataclasses
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import solve
from optimum_sparsesched.obs import admm
from optimum_sparsesched.obs import prune as prune_module
from optimum_sparsesched.obs.inverse import InverseHessian
from optimum_sparsesched.obs.spec import PruneSpec


def layer(rows: int, cols: int, seed: int, n: int | None = None):
    """Weights and a Hessian of correlated, unevenly scaled inputs (as in real activations)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = (torch.randn(n or 4 * cols, cols, generator=g) @ mix) * torch.exp(torch.randn(cols, generator=g))
    return W, 2 * X.t() @ X / X.shape[0]


def optimum_for_mask(W: torch.Tensor, Hd: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row by row: ŵ_S = w_S + H_SS⁻¹ H_SP w_P (the least-squares optimum with ŵ_P = 0), in float64."""
    out = torch.zeros_like(W, dtype=torch.float64)
    H = Hd.double()
    for r in range(W.shape[0]):
        keep, drop = ~mask[r], mask[r]
        w = W[r].double()
        if keep.any():
            out[r, keep] = w[keep] + torch.linalg.solve(H[keep][:, keep], H[keep][:, drop] @ w[drop])
    return out.float()


def test_refit_reaches_the_least_squares_optimum_of_its_mask():
    W, H = layer(5, 10, seed=1)
    inverse = InverseHessian(H, 0.01)
    mask = torch.rand(5, 10, generator=torch.Generator().manual_seed(2)) < 0.6
    normalized = admm.NormalizedLayer.of(W, inverse)
    X = normalized.to_weight(admm.refit(normalized, mask, normalized.W.masked_fill(mask, 0), iterations=10))
    best = optimum_for_mask(W, inverse.damped(), mask)
    assert (X[mask] == 0).all()
    torch.testing.assert_close(X, best, rtol=1e-3, atol=1e-4)  # CG is exact in <= |kept| <= 10 steps


@pytest.mark.parametrize("seed", range(6))
def test_admm_finds_the_brute_force_optimal_support_of_tiny_layers(seed):
    """One row of 8 weights at sparsity 0.5: all 70 supports tried; the optimum of each by least squares."""
    W, H = layer(1, 8, seed)
    inverse = InverseHessian(H, 0.01)
    Hd = inverse.damped()
    losses = []
    for drop in itertools.combinations(range(8), 4):
        mask = torch.zeros(1, 8, dtype=torch.bool)
        mask[0, list(drop)] = True
        losses.append(admm.layer_loss(W, optimum_for_mask(W, Hd, mask), Hd))
    best = min(losses)
    result = solve(W, inverse, 0.5, solver="admm")
    assert result.loss >= best * (1 - 1e-4)  # nothing beats the optimum
    assert result.loss <= result.sparsegpt_loss * (1 + 1e-6)
    assert result.loss <= best * 1.02, (result.loss, best, result.sparsegpt_loss)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_admm_stops_once_the_support_is_frozen_at_the_loss_of_every_iteration(nm, monkeypatch):
    """The search ends after ADMM_PATIENCE iterations without a change of the support, well before ADMM_ITERATIONS;
    the refitted loss is that of the full iteration count to 0.5%, and the N:M pattern holds."""
    W, H = layer(64, 96, seed=3)
    spec = PruneSpec(0.5, nm=nm, solver="admm")
    calls = []
    real = admm.project
    monkeypatch.setattr(admm, "project", lambda Z, spec: calls.append(1) or real(Z, spec))
    early = prune_module.prune(W, InverseHessian(H, 0.01), spec)
    iterations, calls[:] = len(calls), []
    monkeypatch.setattr(admm, "ADMM_PATIENCE", admm.ADMM_ITERATIONS + 1)
    full = prune_module.prune(W, InverseHessian(H, 0.01), spec)
    assert iterations < admm.ADMM_ITERATIONS == len(calls)
    assert early.solver == full.solver == "admm"
    assert early.loss == pytest.approx(full.loss, rel=5e-3)
    if nm is not None:
        assert ((early.weight.view(64, -1, 4) == 0).sum(-1) >= 2).all()


def test_admm_matches_the_optimum_more_often_than_the_scan():
    hits = {"sparsegpt": 0, "admm": 0}
    for seed in range(20):
        W, H = layer(1, 8, 100 + seed)
        inverse = InverseHessian(H, 0.01)
        Hd = inverse.damped()
        best = min(admm.layer_loss(W, optimum_for_mask(W, Hd, m), Hd) for m in (
            torch.zeros(1, 8, dtype=torch.bool).index_fill_(1, torch.tensor(d), True)
            for d in itertools.combinations(range(8), 4)))
        result = solve(W, inverse, 0.5, solver="admm")
        hits["admm"] += result.loss <= best * 1.001
        hits["sparsegpt"] += result.sparsegpt_loss <= best * 1.001
    assert hits["admm"] >= 15 and hits["admm"] > hits["sparsegpt"], hits


specs = st.sampled_from([
    dict(sparsity=0.5), dict(sparsity=0.8), dict(sparsity=0.5, nm=(2, 4)), dict(sparsity=0.5, nm=(4, 8)),
    dict(sparsity=0.6, bits=4, group_size=16), dict(sparsity=0.5, nm=(2, 4), bits=4, group_size=16),
    dict(sparsity=0.3, bits=8, group_size=-1, sym=True),
])


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), specs, st.sampled_from(["refit", "admm"]), st.booleans())
def test_never_above_the_scan_and_the_same_structure(seed, options, solver, rank_deficient):
    W, H = layer(12, 32, seed, n=8 if rank_deficient else None)
    result = solve(W, H, solver=solver, block_size=16, **options)
    assert result.sparsegpt_loss is not None and result.loss <= result.sparsegpt_loss * (1 + 1e-6) + 1e-9
    Q = result.weight
    assert torch.isfinite(Q).all()
    s = options["sparsity"]
    if "nm" in options:
        n, m = options["nm"]
        assert ((Q == 0).view(12, -1, m).sum(-1) >= n).all()
    elif "bits" not in options:
        assert int((Q == 0).sum()) == round(s * Q.numel())
    else:  # quantized weights may round to zero on top of the pruned ones
        assert int((Q == 0).sum()) >= round(s * Q.numel())
    if "bits" in options:
        width = 32 if options["group_size"] == -1 else options["group_size"]
        for row in Q:
            for group in row.split(width):
                assert torch.unique(group[group != 0]).numel() <= 2 ** options["bits"]
        assert result.grid is not None


def test_a_worse_candidate_falls_back_to_the_scan(monkeypatch):
    W, H = layer(8, 32, seed=3)
    plain = solve(W, H, 0.5)

    def worse(weight, inverse, spec, scan_weight):
        mask = scan_weight == 0
        return scan_weight.masked_fill(~mask, 0.0), mask | True  # everything pruned: far worse

    monkeypatch.setattr(prune_module.admm, "candidate", worse)
    result = solve(W, H, 0.5, solver="admm")
    assert result.solver == "sparsegpt" and torch.equal(result.weight, plain.weight)
    assert result.sparsegpt_loss == pytest.approx(plain.loss, rel=1e-4)


def test_unknown_solver_is_refused():
    W, H = layer(4, 8, seed=0)
    with pytest.raises(ValueError, match="solver"):
        solve(W, H, 0.5, solver="magic")
    assert dataclasses.replace(PruneSpec(0.5), solver="admm").solver == "admm"
