"""The allocation search (schedule/search.py): it keeps the parameter-weighted mean exactly on the target, never
ends above the schedule's KL, is reproducible for a seed, and its options are validated."""

import pytest

from conftest import SMALL, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress
from optimum_sparsesched.schedule.allocators import weighted_mean


def run(tokenizer, seed=0, steps=6, **options):
    model = tiny_model("llama", num_hidden_layers=4, seed=seed)
    cfg = SparseScheduleConfig(**{"sparsity": 0.7, **SMALL, "search_steps": steps, "solver": "sparsegpt", **options})
    compress(model, cfg, tokenizer=tokenizer)
    return model, cfg


def test_search_keeps_the_mean_and_lowers_or_keeps_the_kl(tokenizer):
    model, cfg = run(tokenizer)
    results = cfg.results
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if n in results.layer_sparsities}
    assert weighted_mean(results.layer_sparsities, sizes) == pytest.approx(0.7, abs=1e-3)
    search = results.search
    assert search["steps"] == 6 and search["evaluations"] > 6 and search["blocks_pruned"] >= 4
    assert search["kl_after"] <= search["kl_before"]
    levels = {round(v, 3) for v in results.layer_sparsities.values()}
    assert all(0.0 <= v <= 0.99 for v in levels)


def test_search_is_reproducible_for_a_seed(tokenizer):
    _, a = run(tokenizer, steps=4)
    _, b = run(tokenizer, steps=4)
    assert a.results.layer_sparsities == b.results.layer_sparsities and a.results.search == b.results.search


def test_search_moves_sparsity_between_blocks(tokenizer):
    """On a model whose blocks differ, the search changes the schedule's allocation (searched levels differ from the
    schedule's) while the mean stays on the target."""
    _, searched = run(tokenizer, steps=8)
    _, plain = run(tokenizer, steps=0)
    assert plain.results.search is None
    moved = searched.results.layer_sparsities != plain.results.layer_sparsities
    improved = searched.results.search["kl_after"] < searched.results.search["kl_before"]
    assert moved == improved  # an accepted move always lowered the KL, and only accepted moves change levels


def test_search_options_are_validated():
    with pytest.raises(ValueError, match="`search_steps`"):
        SparseScheduleConfig(search_steps=-1)
    with pytest.raises(ValueError, match="`search_steps`"):
        SparseScheduleConfig(search_steps=4, schedule="uniform")
    with pytest.raises(ValueError, match="`preset`"):
        SparseScheduleConfig(preset="best")
    assert SparseScheduleConfig(preset="quality").search_steps > 0
    assert SparseScheduleConfig(preset="quality", schedule="uniform").search_steps == 0  # the preset's search is off
    assert SparseScheduleConfig(preset="quality", pattern="2:4").solver == "admm"
    assert SparseScheduleConfig().solver == "refit" and SparseScheduleConfig(preset="sparsegpt").solver == "sparsegpt"
