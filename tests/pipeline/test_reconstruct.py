"""Block reconstruction: Adam on the kept weights lowers the block's output error against the dense block, keeps
the mask (and N:M pattern, and the quantization grid) exactly, and never keeps a result that is worse."""

import pytest
import torch

from conftest import CALIBRATION_TEXT, block_visit, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress
from optimum_sparsesched.obs.reconstruct import KeptWeight, ReconstructSpec, on_grid, reconstruct_block, relative_error
from optimum_sparsesched.pipeline.blocks import capture_block_inputs
from optimum_sparsesched.pipeline.distributed import DistributedContext
from optimum_sparsesched.pipeline.plan import is_transposed, weight_matrix
from optimum_sparsesched.sequential import compress_block

OPTIONS = dict(dataset=str(CALIBRATION_TEXT), num_samples=4, seq_len=32, schedule="uniform", preset="sparsegpt")


@torch.no_grad()
def compressed_first_block(family, dtype=torch.float32, **options):
    """Block 0 of a tiny model compressed by SparseGPT, its inputs and the dense block's outputs (the targets)."""
    model = tiny_model(family, dtype=dtype)
    inputs = capture_block_inputs(model, torch.randint(1, 500, (4, 32), generator=torch.Generator().manual_seed(0)),
                                  "cpu")
    config = SparseScheduleConfig(**{**OPTIONS, **options})
    with block_visit(model, inputs) as visit:  # a resident CPU block: the visit object stays usable afterwards
        targets = [visit.forward(h) for h in inputs.hidden]
        compress_block(visit, inputs, {n: config.sparsity for n in visit.modules}, config, "torch", DistributedContext())
    return visit, inputs, targets, config


@torch.no_grad()
def block_error(visit, inputs, targets) -> float:
    return sum(float(relative_error(visit.forward(h), y)) for h, y in zip(inputs.hidden, targets)) / len(targets)


def reconstruct(visit, inputs, targets, epochs, lr, **spec):
    """Block reconstruction of the visited block, as the block loop calls it."""
    weights = [KeptWeight(m.weight, is_transposed(m), visit.grids.get(n)) for n, m in visit.modules.items()]
    return reconstruct_block(weights, lambda j: visit.forward(inputs.hidden[j]), targets,
                             ReconstructSpec(epochs, lr, **spec), frozen=list(visit.block.parameters()))


@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("opt", torch.float32),
                                          ("gpt2", torch.float32), ("llama", torch.bfloat16)])
def test_reconstruction_lowers_the_block_error_and_keeps_the_2of4_mask(family, dtype):
    visit, inputs, targets, config = compressed_first_block(family, dtype, sparsity=0.5, pattern="2:4")
    block, modules = visit.block, visit.modules
    zeros = {n: weight_matrix(m) == 0 for n, m in modules.items()}
    before = block_error(visit, inputs, targets)
    flags = [p.requires_grad for p in block.parameters()]
    fit = reconstruct(visit, inputs, targets, epochs=8, lr=1e-3)
    assert fit.kept and fit.before == pytest.approx(before, rel=1e-5)
    assert fit.after < 0.9 * fit.before  # a clear gain, measured again below
    assert block_error(visit, inputs, targets) == pytest.approx(fit.after, rel=1e-5)
    for name, m in modules.items():
        w = weight_matrix(m)
        assert w.dtype == dtype and torch.isfinite(w).all()
        assert torch.equal(w == 0, zeros[name]), name  # the same zeros: nothing pruned revived, nothing new pruned
        assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all(), name  # 2:4 in every group
    assert [p.requires_grad for p in block.parameters()] == flags and all(p.grad is None for p in block.parameters())


def test_a_worse_result_is_not_kept():
    visit, inputs, targets, _ = compressed_first_block("llama", sparsity=0.5)
    solved = {n: m.weight.detach().clone() for n, m in visit.modules.items()}
    fit = reconstruct(visit, inputs, targets, epochs=2, lr=1.0)
    assert not fit.kept and fit.after == fit.before
    assert all(torch.equal(m.weight, solved[n]) for n, m in visit.modules.items())  # bit for bit the solver's


@pytest.mark.parametrize("group_size", [16, -1])
def test_quantized_weights_end_on_their_grid(group_size):
    visit, inputs, targets, config = compressed_first_block("llama", sparsity=0.5, bits=4, group_size=group_size)
    grids = dict(visit.grids)
    assert set(grids) == set(visit.modules)
    zeros = {n: weight_matrix(m) == 0 for n, m in visit.modules.items()}
    fit = reconstruct(visit, inputs, targets, epochs=8, lr=1e-3, bits=4, group_size=group_size)
    assert fit.after <= fit.before
    for name, m in visit.modules.items():
        w = weight_matrix(m).float()
        assert visit.grids[name] is grids[name]  # the grid is the solve's
        assert torch.equal(on_grid(w, grids[name], 4, group_size), w), name  # every weight is a grid value
        assert (w[zeros[name]] == 0).all(), name  # nothing pruned revives (a kept weight may round to the zero code)


@pytest.mark.parametrize("target", ["dense", "local"])
def test_compress_with_reconstruction_is_closer_to_the_dense_model(target, tokenizer):
    dense = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(1, 500, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = dense(ids).logits.log_softmax(-1)

    def kl(epochs):
        model = tiny_model("llama", num_hidden_layers=3)
        config = SparseScheduleConfig(**{**OPTIONS, "num_samples": 8}, sparsity=0.5, pattern="2:4",
                                      reconstruct_epochs=epochs, reconstruct_lr=1e-3, reconstruct_target=target)
        compress(model, config, tokenizer=tokenizer)
        with torch.no_grad():
            logp = model(ids).logits.log_softmax(-1)
        return (float((reference.exp() * (reference - logp)).sum(-1).mean()), config.results.layer_sparsities,
                model.state_dict())

    without, sparsities, _ = kl(0)
    with_reconstruction, same, weights = kl(4)
    assert same == sparsities  # the masks are the solver's
    assert with_reconstruction < 0.9 * without
    again = kl(4)[2]  # the same seed: the same weights, bit for bit
    assert all(torch.equal(again[k], v) for k, v in weights.items())


@torch.no_grad()
def test_the_after_pass_outputs_are_the_kept_weights_outputs_and_a_refusal_hands_none_on():
    """compress_block hands the reconstruction's after-pass outputs on as the next block's inputs only when the new
    weights are kept: they are then the block's outputs bit for bit, as a forward after the solve computes them."""
    model = tiny_model("llama")
    inputs = capture_block_inputs(model, torch.randint(1, 500, (4, 32), generator=torch.Generator().manual_seed(0)),
                                  "cpu")
    for lr, kept in ((1e-3, True), (1.0, False)):
        config = SparseScheduleConfig(**OPTIONS, sparsity=0.5, reconstruct_epochs=2, reconstruct_lr=lr,
                                      reconstruct_target="local")
        outputs = []
        with block_visit(tiny_model("llama"), inputs) as visit:
            compress_block(visit, inputs, {n: 0.5 for n in visit.modules}, config, "torch", DistributedContext(),
                           outputs=outputs)
            fresh = [visit.forward(h) for h in inputs.hidden]
        assert bool(outputs) == kept
        for out, ref in zip(outputs, fresh):
            assert torch.equal(out, ref)


@torch.no_grad()
def test_the_local_target_is_the_dense_block_on_the_compressed_inputs(monkeypatch):
    """With ``reconstruct_target="local"`` the targets are the block's outputs before the solve, on the block's
    own (compressed-model) inputs, as the Hessian forward records them; no dense stream is needed."""
    import optimum_sparsesched.sequential as sequential

    model = tiny_model("llama")
    inputs = capture_block_inputs(model, torch.randint(1, 500, (4, 32), generator=torch.Generator().manual_seed(0)),
                                  "cpu")
    seen = []
    real = sequential.reconstruct_block
    monkeypatch.setattr(sequential, "reconstruct_block", lambda w, f, targets, *a, **k: seen.append(
        [t.clone() for t in targets]) or real(w, f, targets, *a, **k))
    config = SparseScheduleConfig(**OPTIONS, sparsity=0.5, reconstruct_epochs=1, reconstruct_target="local")
    with block_visit(model, inputs) as visit:
        dense = [visit.forward(h) for h in inputs.hidden]
        compress_block(visit, inputs, {n: 0.5 for n in visit.modules}, config, "torch", DistributedContext())
    assert len(seen) == 1 and all(torch.equal(t, y) for t, y in zip(seen[0], dense))


@pytest.mark.parametrize("name,value", [("reconstruct_epochs", -1), ("reconstruct_epochs", 1.5),
                                        ("reconstruct_epochs", True), ("reconstruct_epochs", 10**6),
                                        ("reconstruct_lr", 0), ("reconstruct_lr", float("nan")),
                                        ("reconstruct_lr", 2.0), ("reconstruct_lr", "3e-4"),
                                        ("reconstruct_target", "global"), ("reconstruct_target", None)])
def test_bad_reconstruction_options_name_the_option(name, value):
    with pytest.raises(ValueError, match=name):
        SparseScheduleConfig(**{name: value})


def test_reconstruction_is_in_the_quality_preset_only_and_off_in_configs_saved_before_it():
    assert [SparseScheduleConfig(preset=p).reconstruct_epochs for p in ("sparsegpt", "default", "quality")] == [0, 0, 3]
    assert SparseScheduleConfig(preset="quality", reconstruct_epochs=0).reconstruct_epochs == 0  # an explicit value wins
    saved = SparseScheduleConfig(reconstruct_epochs=3).to_dict()
    assert SparseScheduleConfig.from_dict(saved).reconstruct_epochs == 3
    saved.pop("reconstruct_epochs")
    saved.pop("reconstruct_target")
    old = SparseScheduleConfig.from_dict(saved)
    assert old.reconstruct_epochs == 0 and old.reconstruct_target == "dense"  # saved before the options
    local = SparseScheduleConfig(reconstruct_target="local").to_dict()
    assert SparseScheduleConfig.from_dict(local).reconstruct_spec().target == "local"


def test_the_memory_estimate_counts_the_dense_stream_and_the_optimiser():
    from optimum_sparsesched.pipeline.plan import plan_compression
    from optimum_sparsesched.pipeline.residency import activation_bytes, estimate_working_set, tensor_bytes

    model = tiny_model("llama")
    plan = plan_compression(model, SparseScheduleConfig(**OPTIONS).plan_spec())
    off, on = (estimate_working_set(model, plan.blocks, plan.modules,
                                    SparseScheduleConfig(**OPTIONS, reconstruct_epochs=e).residency_spec())
               for e in (0, 3))
    weights = sum(m.weight.numel() for m in plan.modules[0].values())
    assert off.reconstruction == 0 and on.reconstruction == (2 * 4 + 21) * weights + 3 * on.forward
    assert on.block_phase == on.weights + max(on.hessians + max(on.obs, on.forward), on.reconstruction)
    inputs = capture_block_inputs(model, torch.randint(1, 500, (3, 16)), "cpu")
    assert (activation_bytes(inputs, 0, 0, reconstruct=True) - activation_bytes(inputs, 0, 0)
            == 2 * tensor_bytes(inputs.hidden))
