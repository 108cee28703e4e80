"""The one-backward damage estimate (schedule/fisher.py): its block-by-block backward gives the gradients a
whole-model backward gives, its second-order estimate tracks the measured KL of a small perturbation, and the
schedule built on it keeps the target, the range and a seed's result; the "auto" range's cap and shrinkage."""

import pytest
import torch

from conftest import SMALL, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress
from optimum_sparsesched.obs.inverse import InverseHessian
from optimum_sparsesched.pipeline.blocks import capture_block_inputs
from optimum_sparsesched.pipeline.calibration import calibration_windows
from optimum_sparsesched.pipeline.hessians import collect_block_hessians
from optimum_sparsesched.pipeline.plan import plan_compression
from optimum_sparsesched.pipeline.sources import BlockSource
from optimum_sparsesched.schedule import fisher
from optimum_sparsesched.schedule.allocate import reliability
from optimum_sparsesched.schedule.allocators import weighted_mean
from optimum_sparsesched.schedule.statistics import pruned_alone


def _probe(model, tokenizer, cfg):
    """The plan, the probe windows, a source with their captured block inputs, and every block's dense inputs."""
    plan = plan_compression(model, cfg.plan_spec())
    windows = calibration_windows(cfg.dataset, tokenizer, cfg.num_samples, cfg.seq_len, cfg.seed)[: cfg.probe_samples]
    source = BlockSource(plan)
    source.inputs = capture_block_inputs(model, windows, torch.device("cpu"))
    dense = [list(source.inputs.hidden)]
    for index in range(len(plan.blocks)):
        with source.visit(index, "cpu") as visit:
            dense.append([visit.forward(h) for h in dense[-1]])
    return plan, windows, source, dense


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_block_by_block_backward_matches_a_whole_model_backward(family, tokenizer, monkeypatch):
    """The gradient w.r.t. every block's output from the reverse pass equals what autograd gives through the whole
    model for the same labels (here the argmax, so both sides draw the same ones)."""
    monkeypatch.setattr(fisher, "sample_labels", lambda probs, _generator: probs.argmax(-1, keepdim=True))
    model = tiny_model(family)
    cfg = SparseScheduleConfig(sparsity=0.7, **SMALL)
    plan, windows, source, dense = _probe(model, tokenizer, cfg)
    got = dict(fisher.output_gradients(model, source, source.inputs, windows, dense, 0, torch.device("cpu")))
    expected = {}

    def keep(index):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden.register_hook(lambda g: expected.setdefault(index, []).append(g.clone()) and None)
        return hook

    handles = [b.register_forward_hook(keep(i)) for i, b in enumerate(plan.blocks)]
    try:
        for row in windows:
            logp = torch.log_softmax(model(input_ids=row.unsqueeze(0), use_cache=False).logits.float(), -1)[0]
            (-logp.gather(1, logp.argmax(-1, keepdim=True)).sum()).backward()
    finally:
        for h in handles:
            h.remove()
    assert sorted(got) == list(range(len(plan.blocks)))
    for index, grads in got.items():
        assert len(grads) == len(windows)
        for g, ref in zip(grads, expected[index]):
            torch.testing.assert_close(g, ref, rtol=2e-3, atol=1e-6)


def test_second_order_estimate_tracks_the_measured_kl(tokenizer):
    """For a small perturbation of one block (its modules pruned at 5% with the OBS update), the estimate
    ``½ Σ g² δh² / T`` averaged over label draws is within a factor 2 of the measured per-token KL."""
    model = tiny_model("llama")
    cfg = SparseScheduleConfig(sparsity=0.05, **{**SMALL, "probe_samples": 4})
    plan, windows, source, dense = _probe(model, tokenizer, cfg)
    with torch.no_grad(), source.visit(0, "cpu") as visit:
        accumulators = collect_block_hessians(visit, dense[0])
        pruned = pruned_alone(visit, {n: InverseHessian(a.H, cfg.damp) for n, a in accumulators.items()},
                              cfg.schedule_spec())
        with visit.swapped(pruned):
            deltas = [visit.forward(h) - ref for h, ref in zip(dense[0], dense[1])]
    estimates = []
    for seed in range(6):
        grads = dict(fisher.output_gradients(model, source, source.inputs, windows, dense, seed, torch.device("cpu")))
        per_window = fisher.fisher_damage(grads[0], deltas)
        estimates.append(sum(per_window) / len(per_window))
    estimate = sum(estimates) / len(estimates)
    with torch.no_grad():
        ref = [torch.log_softmax(model(input_ids=w.unsqueeze(0)).logits.float(), -1) for w in windows]
        for n, m in plan.modules[0].items():
            m.weight.data.copy_(pruned[n])
        logq = [torch.log_softmax(model(input_ids=w.unsqueeze(0)).logits.float(), -1) for w in windows]
    kl = sum(float((p.exp() * (p - q)).sum(-1).mean()) for p, q in zip(ref, logq)) / len(windows)
    assert kl > 0 and 0.5 < estimate / kl < 2.0, (estimate, kl)


@pytest.mark.parametrize("family", ["llama", "opt", "gemma3"])
def test_fisher_schedule_keeps_the_target_and_one_sparsity_per_block(family, tokenizer):
    model = tiny_model(family)
    cfg = SparseScheduleConfig(sparsity=0.7, **SMALL)
    assert cfg.error_metric == "fisher"  # the default
    compress(model, cfg, tokenizer=tokenizer)
    achieved = cfg.results.layer_sparsities
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if n in achieved}
    assert weighted_mean(achieved, sizes) == pytest.approx(0.7, abs=1e-3)
    lo, hi = cfg.results.resolved_range
    assert all(lo - 2e-3 <= v <= hi + 2e-3 for v in achieved.values())
    assert all(e > 0 for e in cfg.results.layer_errors.values())


def test_fisher_schedule_is_reproducible_for_a_seed(tokenizer):
    runs = []
    for seed in (0, 0, 1):
        model = tiny_model("llama", num_hidden_layers=4)
        cfg = SparseScheduleConfig(sparsity=0.7, solver="sparsegpt", **{**SMALL, "seed": seed})
        compress(model, cfg, tokenizer=tokenizer)
        runs.append((cfg.results.layer_sparsities, cfg.results.layer_errors))
    assert runs[0] == runs[1]
    assert runs[0][1] != runs[2][1]  # another seed: other windows and labels, other estimates


def test_reliability_keeps_signal_and_drops_noise():
    distinct = [[10.0 ** b * (1 + 0.01 * w) for w in range(4)] for b in range(6)]
    assert reliability(distinct) > 0.99
    noise = [[[1.0, 2.0, 0.5, 1.5][(w + b) % 4] for w in range(4)] for b in range(6)]
    assert reliability(noise) == 0.0
    assert reliability([[1.0], [2.0]]) == 1.0


def test_auto_range_keeps_two_thirds_of_the_target_density(tokenizer):
    """Whatever the measured damage, an "auto" range never goes above ``target + (1 − target)/3``."""
    model = tiny_model("llama", num_hidden_layers=4)
    cfg = SparseScheduleConfig(sparsity=0.7, solver="sparsegpt", **SMALL)
    compress(model, cfg, tokenizer=tokenizer)
    lo, hi = cfg.results.resolved_range
    assert lo <= 0.7 <= hi <= 0.8 + 1e-9
    assert max(cfg.results.layer_sparsities.values()) <= 0.8 + 2e-3
