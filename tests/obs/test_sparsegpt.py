"""SparseGPT OBS on single layers: exact sparsity, N:M, quantization grids, error vs magnitude/Wanda, numerics."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import solve
from optimum_sparsesched.obs.grid import QuantGrid
from optimum_sparsesched.obs.inverse import inverse_hessian_cholesky
from optimum_sparsesched.pipeline.hessians import HessianAccumulator


def correlated_layer(rows=64, cols=128, n=2048, seed=0):
    """Weights and inputs with strongly correlated, unevenly scaled features (as in real activations)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    scales = torch.exp(torch.randn(cols, generator=g))
    X = (torch.randn(n, cols, generator=g) @ mix) * scales  # [n, cols]
    acc = HessianAccumulator(cols, torch.device("cpu"))
    for chunk in X.split(256):
        acc.add_batch(chunk)
    return W, X, acc.H


def output_error(W, What, X):
    return torch.linalg.norm(X @ W.t() - X @ What.t()).item()


def test_hessian_matches_definition():
    W, X, H = correlated_layer(n=1000)
    torch.testing.assert_close(H, 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_unstructured_sparsity_is_exact(sparsity):
    W, X, H = correlated_layer(rows=48, cols=200)
    Q = solve(W, H, sparsity, block_size=64).weight
    assert (Q == 0).sum().item() == round(sparsity * Q.numel())


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_pattern_holds_in_every_group(n, m):
    W, X, H = correlated_layer(rows=32, cols=128)
    Q = solve(W, H, n / m, nm=(n, m)).weight
    groups = (Q == 0).view(Q.shape[0], -1, m).sum(-1)
    assert (groups >= n).all()
    assert (groups == n).float().mean() > 0.99  # extra zeros only where a kept weight happened to be exactly 0


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
def test_joint_int4_has_at_most_16_values_per_group(sym, group_size):
    W, X, H = correlated_layer(rows=16, cols=128)
    Q = solve(W, H, 0.5, bits=4, group_size=group_size, sym=sym).weight
    width = Q.shape[1] if group_size == -1 else group_size
    for row in Q:
        for group in row.split(width):
            kept = group[group != 0]
            assert torch.unique(kept).numel() <= 15 + (0 if sym else 1)
    assert (Q == 0).float().mean() >= 0.5


def test_group_size_not_dividing_the_inputs_leaves_a_shorter_last_group():
    W, X, H = correlated_layer(rows=8, cols=80)
    Q = solve(W, H, 0.5, bits=4, group_size=32).weight  # groups of 32, 32 and 16 columns
    for row in Q:
        for group in (row[:32], row[32:64], row[64:]):
            assert torch.unique(group[group != 0]).numel() <= 16
    assert torch.isfinite(Q).all()


def test_int8_without_pruning_is_close():
    W, X, H = correlated_layer(rows=16, cols=128)
    Q = solve(W, H, 0.0, bits=8, group_size=64).weight
    assert output_error(W, Q, X) / torch.linalg.norm(X @ W.t()).item() < 0.02


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsegpt_beats_magnitude_and_wanda(sparsity):
    W, X, H = correlated_layer()
    Q = solve(W, H, sparsity).weight
    k = int(sparsity * W.shape[1])
    # magnitude: globally smallest |w|
    mag = W.clone()
    mag.view(-1)[W.abs().flatten().topk(int(sparsity * W.numel()), largest=False).indices] = 0
    # Wanda: per output row, smallest |w| * ||x_j||
    score = W.abs() * X.norm(dim=0).unsqueeze(0)
    wanda = W.clone().scatter_(1, score.topk(k, dim=1, largest=False).indices, 0)
    e_sgpt, e_mag, e_wanda = output_error(W, Q, X), output_error(W, mag, X), output_error(W, wanda, X)
    assert e_sgpt < e_wanda < e_mag


def test_dead_inputs_are_zeroed_and_finite():
    W, X, H = correlated_layer(rows=16, cols=64)
    H[:, 5] = 0
    H[5, :] = 0
    Q = solve(W, H, 0.5).weight
    assert (Q[:, 5] == 0).all()
    assert torch.isfinite(Q).all()


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    """U (one Cholesky of the reversed H + λI and a triangular inverse) against the reference's
    cholesky(cholesky_inverse(cholesky(H + λI)), upper=True) in float64: UᵀU = (H + λI)⁻¹, U upper, diagonal > 0."""
    _, _, H = correlated_layer(cols=96)
    U, lam = inverse_hessian_cholesky(H, 0.01)
    H64 = H.double() + lam * torch.eye(96, dtype=torch.float64)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H64)), upper=True)
    assert lam == pytest.approx(0.01 * torch.diag(H).mean().item())
    assert torch.equal(U, torch.triu(U)) and bool((torch.diag(U) > 0).all())
    torch.testing.assert_close(U.double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_singular_hessian_escalates_damping(caplog):
    rank_deficient = torch.randn(64, 4)
    H = rank_deficient @ rank_deficient.t()  # rank 4, PSD, not PD
    H[0, 1] = H[1, 0] = H[0, 0] * 10  # indefinite
    U, lam = inverse_hessian_cholesky(H, 1e-6)
    assert torch.isfinite(U).all() and lam > 1e-6 * torch.diag(H).mean().item()
    assert "escalating" in caplog.text


def test_quant_grid_keeps_zero_exact():
    grid = QuantGrid(4, sym=False)
    w = torch.randn(4, 32)
    grid.find_params(w)
    assert (grid.quantize(torch.zeros(4, 1)) == 0).all()
    assert torch.unique(grid.quantize(w)[0]).numel() <= 16


def test_loss_estimate_tracks_true_error():
    W, X, H = correlated_layer()
    losses = [solve(W, H, s).loss for s in (0.3, 0.5, 0.7)]
    assert losses[0] < losses[1] < losses[2]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), fraction=st.floats(0.0, 1.0), ties=st.integers(0, 4), seed=st.integers(0, 10**6),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_the_k_smallest_are_topks_and_ties_go_by_index(n, fraction, ties, seed, dtype):
    from optimum_sparsesched.obs.columns import smallest_

    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, generator=g, dtype=dtype)
    if ties:  # a few distinct values only: every selection boundary is a tie
        values = torch.randint(0, ties, (n,), generator=g).to(dtype)
    k = round(fraction * n)
    mask = torch.zeros(n, dtype=torch.bool)
    smallest_(mask, values, k)
    assert int(mask.sum()) == k
    if k:
        t = values[mask].max()
        assert bool((values[~mask] >= t).all()) and bool((values < t)[~mask].logical_not().all())
        chosen_ties = (values == t) & mask
        left_ties = (values == t) & ~mask
        if left_ties.any():  # ties go to the lower indices
            assert int(chosen_ties.nonzero().max()) < int(left_ties.nonzero().min())
    if not ties:  # distinct values: the same set as torch.topk
        reference = torch.zeros(n, dtype=torch.bool)
        if k:
            reference[torch.topk(values, k, largest=False).indices] = True
        assert torch.equal(mask, reference)
    nan = values.clone()
    nan[0] = float("nan")
    short = torch.zeros(n, dtype=torch.bool)
    smallest_(short, nan, n)  # NaN: numpy's selection comes short, torch.topk's takes over
    assert int(short.sum()) == n
