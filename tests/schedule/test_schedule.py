"""The scheduler: allocator properties (hypothesis), the OBS saliency estimator against brute force, and the
schedules end to end on tiny models."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import SMALL, FAMILIES, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress
from optimum_sparsesched.schedule.allocators import (
    fit_to_target,
    level_schedule,
    log_levels,
    optimal_allocation,
    owl_schedule,
    ramp_schedule,
    weighted_mean,
)
from optimum_sparsesched.schedule.statistics import local_loss_curve, saliencies


layer_stats = st.lists(st.tuples(st.floats(1e-6, 1e6), st.integers(1, 10_000)), min_size=1, max_size=40)
ranges = st.tuples(st.floats(0.0, 0.6), st.floats(0.0, 0.39)).map(lambda t: (t[0], t[0] + t[1]))


def as_dicts(stats):
    errors = {f"l{i}": e for i, (e, _) in enumerate(stats)}
    sizes = {f"l{i}": n for i, (_, n) in enumerate(stats)}
    return errors, sizes


@settings(max_examples=200, deadline=None)
@given(layer_stats, ranges, st.floats(0, 1), st.integers(1, 8))
def test_level_schedule_properties(stats, rng, where, levels):
    errors, sizes = as_dicts(stats)
    lo, hi = rng
    target = lo + where * (hi - lo)
    s = level_schedule(errors, sizes, target, lo, hi, levels)
    assert abs(weighted_mean(s, sizes) - target) < 1e-6  # mean on target (spec: 1e-3)
    assert all(lo - 1e-9 <= v <= hi + 1e-9 for v in s.values())  # inside the range
    ordered = sorted(errors, key=errors.get)  # monotone: more damage, less (or equal) sparsity
    assert all(s[a] >= s[b] - 1e-9 for a, b in zip(ordered, ordered[1:]))


@settings(max_examples=100, deadline=None)
@given(st.floats(1e-3, 1e3), st.lists(st.integers(1, 1000), min_size=1, max_size=20), ranges, st.integers(1, 8))
def test_equal_estimates_give_uniform(error, sizes_list, rng, levels):
    sizes = {f"l{i}": n for i, n in enumerate(sizes_list)}
    lo, hi = rng
    target = (lo + hi) / 2
    s = level_schedule({n: error for n in sizes}, sizes, target, lo, hi, levels)
    assert all(abs(v - target) < 1e-9 for v in s.values())


@settings(max_examples=100, deadline=None)
@given(layer_stats, ranges, st.floats(0, 1))
def test_fit_ramp_owl_hit_target(stats, rng, where):
    errors, sizes = as_dicts(stats)
    lo, hi = rng
    target = lo + where * (hi - lo)
    for s, (a, b) in ((fit_to_target(errors and {n: math.log(e) for n, e in errors.items()}, sizes, target, lo, hi),
                       (lo, hi)),
                      (ramp_schedule(sizes, target, lo, hi), (lo, hi)),
                      (owl_schedule(errors, sizes, target, 0.08), (max(0, target - 0.08), min(0.99, target + 0.08)))):
        assert abs(weighted_mean(s, sizes) - target) < 1e-6
        assert all(a - 1e-9 <= v <= b + 1e-9 for v in s.values())


def test_unreachable_range_is_an_error():
    with pytest.raises(ValueError, match="sparsity_range"):
        fit_to_target({"a": 0.5}, {"a": 1}, 0.9, 0.1, 0.5)


def test_log_levels_cluster_by_orders_of_magnitude():
    levels = log_levels({"a": 1.0, "b": 1.5, "c": 100.0, "d": 1e4}, 3)
    assert levels["a"] == levels["b"] == 0 and levels["c"] == 1 and levels["d"] == 2


def test_levels_split_the_bulk_despite_an_outlier():
    """Equal-width bins between the extremes would lump the ten bulk layers into one level; k-means does not."""
    errors = {f"l{i}": 1.0 + 0.1 * i for i in range(10)} | {"outlier": 1e6}
    levels = log_levels(errors, 4)
    assert len({levels[f"l{i}"] for i in range(10)}) >= 2 and levels["outlier"] == max(levels.values())


def test_optimal_allocation_prunes_cheap_layers_harder():
    grid = [i / 100 for i in range(101)]
    curves = {"cheap": (grid, [math.exp(8 * s) for s in grid]), "dear": (grid, [10 * math.exp(8 * s) for s in grid])}
    s = optimal_allocation(curves, {"cheap": 1, "dear": 1}, 0.6, 0.3, 0.9)
    assert s["cheap"] > s["dear"]
    assert abs((s["cheap"] + s["dear"]) / 2 - 0.6) < 1e-9
    # the stationarity condition D'(s) equal for both: 8e^{8a} = 80e^{8b} -> a - b = ln(10)/8
    assert s["cheap"] - s["dear"] == pytest.approx(math.log(10) / 8, abs=0.02)


def test_saliency_matches_brute_force_obs():
    g = torch.Generator().manual_seed(0)
    cols = 6
    X = torch.randn(50, cols, generator=g) @ torch.randn(cols, cols, generator=g)
    H = 2 * X.t() @ X / 50
    W = torch.randn(3, cols, generator=g)
    damp = 1e-3
    eps = saliencies(W, H, damp)
    Hd = (H + damp * torch.diag(H).mean() * torch.eye(cols)).double()
    for r in range(W.shape[0]):
        for q in range(cols):
            # prune w_rq with columns < q fixed, columns > q free: min over δ_F of ½ δᵀ H δ with δ_q = -w_rq
            free = list(range(q + 1, cols))
            w = float(W[r, q])
            if free:
                dF = w * torch.linalg.solve(Hd[free][:, free], Hd[free, q])
                delta = torch.zeros(cols, dtype=torch.float64)
                delta[q] = -w
                delta[free] = dF
            else:
                delta = torch.zeros(cols, dtype=torch.float64)
                delta[q] = -w
            brute = 0.5 * float(delta @ Hd @ delta)
            assert 0.5 * float(eps[r, q]) == pytest.approx(brute, rel=1e-3)


def test_local_loss_curve_sums_smallest_saliencies():
    eps = torch.tensor([[4.0, 1.0], [3.0, 2.0]])
    curve = local_loss_curve(eps, torch.tensor([0.0, 0.25, 0.5, 1.0]))
    assert curve.tolist() == [0.0, 0.5, 1.5, 5.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_local_loss_curve_equals_the_float64_sort(dtype):
    g = torch.Generator().manual_seed(0)
    eps = (torch.rand(37, 211, generator=g) ** 3).to(dtype)
    eps[:, ::7] = 0  # dead inputs and ties
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    flat = torch.sort(eps.float().double().flatten()).values
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(flat, 0)])
    expected = 0.5 * csum[torch.round(grid * flat.numel()).long()]
    assert torch.equal(local_loss_curve(eps, grid), expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("options", [
    dict(schedule="hessian"), dict(schedule="hessian", error_metric="kl-alone"),
    dict(schedule="hessian", sparsity_range=(0.6, 0.8)),
    dict(schedule="hessian", error_metric="obs", sparsity_range=(0.6, 0.8)), dict(schedule="owl"),
    dict(schedule="ramp", sparsity_range=(0.6, 0.8)),
])
def test_schedules_end_to_end(family, options, tokenizer):
    model = tiny_model(family)
    cfg = SparseScheduleConfig(sparsity=0.7, **options, **SMALL)
    compress(model, cfg, tokenizer=tokenizer)
    modules = dict(model.named_modules())
    sizes = {n: modules[n].weight.numel() for n in cfg.results.layer_sparsities}
    assert abs(weighted_mean(cfg.results.layer_sparsities, sizes) - 0.7) < 1e-3
    lo, hi = cfg.results.resolved_range if cfg.results.resolved_range else (0.6, 0.8)
    assert all(lo - 2e-3 <= v <= hi + 2e-3 for v in cfg.results.layer_sparsities.values())
    assert set(cfg.results.layer_errors) == set(cfg.results.layer_sparsities)
    assert all(math.isfinite(e) and e >= 0 for e in cfg.results.layer_errors.values())
    per_block = {}  # one sparsity per block
    for n, v in cfg.results.layer_sparsities.items():
        per_block.setdefault(n.split(".h.")[-1].split(".layers.")[-1].split(".")[0], []).append(v)
    assert len(per_block) == model.config.get_text_config().num_hidden_layers
    assert all(max(v) - min(v) < 2e-3 for v in per_block.values())


def test_hessian_schedule_measures_end_to_end_damage(tokenizer):
    model = tiny_model("llama", num_hidden_layers=4)
    cfg = SparseScheduleConfig(sparsity=0.7, schedule="hessian", **SMALL)
    compress(model, cfg, tokenizer=tokenizer)
    assert cfg.results.resolved_range[0] <= 0.7 <= cfg.results.resolved_range[1]
    block_errors = {}
    for n, e in cfg.results.layer_errors.items():
        block = int(n.split(".")[2])
        block_errors[block] = block_errors.get(block, 0.0) + e
    assert len(block_errors) == 4 and all(e > 0 for e in block_errors.values())


def test_schedule_with_pattern_is_rejected():
    with pytest.raises(ValueError, match="`schedule`"):
        SparseScheduleConfig(sparsity=0.5, pattern="2:4", schedule="hessian")
    assert SparseScheduleConfig(sparsity=0.5, pattern="2:4").schedule == "uniform"
    assert SparseScheduleConfig(sparsity=0.5).schedule == "hessian"


@pytest.mark.parametrize("kwargs,option", [
    (dict(sparsity_range=(0.8, 0.6)), "sparsity_range"), (dict(sparsity=0.9, sparsity_range=(0.6, 0.8)), "sparsity_range"),
    (dict(sparsity_range=(0.5, 1.0)), "sparsity_range"), (dict(sparsity_range="wide"), "sparsity_range"),
    (dict(num_levels=0), "num_levels"),
    (dict(error_metric="mse"), "error_metric"), (dict(error_metric="kl"), "error_metric"), (dict(owl_lambda=-1), "owl_lambda"), (dict(probe_samples=0), "probe_samples"),
])
def test_bad_schedule_options(kwargs, option):
    with pytest.raises(ValueError, match=f"`{option}`"):
        SparseScheduleConfig(**kwargs)
