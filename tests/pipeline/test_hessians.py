"""Hessian capture: H = 2XXᵀ/n (float32 products summed in float64), shared between modules that read the same input."""

import pytest
import torch

from conftest import block_visit, tiny_model
from optimum_sparsesched.pipeline.blocks import capture_block_inputs, find_decoder_blocks
from optimum_sparsesched.pipeline.hessians import HessianAccumulator, collect_block_hessians


def test_non_finite_activations_raise():
    acc = HessianAccumulator(8, torch.device("cpu"))
    with pytest.raises(FloatingPointError):
        acc.add_batch(torch.tensor([[float("nan")] * 8]))


def test_the_hessian_does_not_depend_on_how_the_windows_are_split():
    """Two ranks' sums (windows 0, 2, 4, ... and 1, 3, 5, ...) add up to one process's Hessian bit for bit, also
    with windows of very different scales: the float32 products are summed in float64."""
    generator = torch.Generator().manual_seed(0)
    windows = [torch.randn(64, 48, generator=generator) * 10.0 ** (j % 5 - 2) for j in range(12)]
    whole = HessianAccumulator(48, torch.device("cpu"))
    ranks = [HessianAccumulator(48, torch.device("cpu")) for _ in range(2)]
    for j, w in enumerate(windows):
        whole.add_batch(w)
        ranks[j % 2].add_batch(w)

    class TwoRanks:  # the all-reduce of torch.distributed over these two accumulators
        def all_reduce_(self, tensor):
            return tensor + (ranks[1].S if tensor.numel() > 1 else torch.tensor([float(ranks[1].n)],
                                                                                 dtype=torch.float64))

    expected = whole.H
    assert torch.equal(ranks[0].reduced(TwoRanks()), expected)
    reference = 2 * sum(w.double().t() @ w.double() for w in windows) / sum(w.shape[0] for w in windows)
    assert (expected.double() - reference).abs().max() <= 1e-6 * reference.abs().max()


def test_modules_reading_the_same_input_share_one_hessian():
    model = tiny_model("llama")
    inputs = capture_block_inputs(model, torch.randint(1, 500, (2, 16)), "cpu")
    _, blocks = find_decoder_blocks(model)
    with block_visit(model, inputs) as visit:
        acc = collect_block_hessians(visit, inputs.hidden)
    p = "model.layers.0."
    assert acc[p + "self_attn.q_proj"] is acc[p + "self_attn.k_proj"] is acc[p + "self_attn.v_proj"]
    assert acc[p + "mlp.gate_proj"] is acc[p + "mlp.up_proj"]
    assert len({id(a) for a in acc.values()}) == 4  # qkv, o, gate/up, down
    # the shared Hessian is the one of the (common) input
    seen = []
    k_proj = blocks[0].self_attn.k_proj
    handle = k_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, 64)))
    for h in inputs.hidden:
        blocks[0](h, *inputs.args[0], **inputs.kwargs[0])
    handle.remove()
    X = torch.cat(seen)
    torch.testing.assert_close(acc[p + "self_attn.k_proj"].H, 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_a_stopped_pass_collects_the_hessians_of_a_complete_one(family):
    """Without outputs to keep, each window's forward stops once the last group's input is seen: the last modules
    never compute, and every Hessian is the one a complete pass collects, bit for bit."""
    model = tiny_model(family)
    inputs = capture_block_inputs(model, torch.randint(1, 500, (3, 16)), "cpu")
    with block_visit(model, inputs) as visit:
        complete = collect_block_hessians(visit, inputs.hidden, outputs=[])
        order = []
        handles = [m.register_forward_hook(lambda m, a, o, n=n: order.append(n)) for n, m in visit.modules.items()]
        visit.forward(inputs.hidden[0])
        for h in handles:
            h.remove()
        calls = []
        handle = visit.modules[order[-1]].register_forward_hook(lambda m, a, o: calls.append(1))
        stopped = collect_block_hessians(visit, inputs.hidden)
        handle.remove()
    assert not calls  # the module the forward reaches last never ran
    assert list(stopped) == list(visit.modules)
    groups = {id(a) for a in complete.values()}
    assert len({id(a) for a in stopped.values()}) == len(groups) >= 3
    for n in visit.modules:
        assert torch.equal(stopped[n].H, complete[n].H) and stopped[n].n == complete[n].n


def test_hessian_accumulated_in_strips_is_the_full_product_and_exactly_symmetric():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3 * 64, 700, generator=g) * torch.exp(torch.randn(700, generator=g))  # 2 strips of 350 rows
    acc = HessianAccumulator(700, "cpu")
    for chunk in X.split(64):
        acc.add_batch(chunk)
    assert torch.equal(acc.H, acc.H.T)
    torch.testing.assert_close(acc.H, 2 * X.t() @ X / X.shape[0], rtol=1e-5, atol=1e-4)
    acc.add_batch(X[:64])  # accumulating again after a read: mirrored again from the updated strips
    torch.testing.assert_close(acc.H, 2 * torch.cat([X, X[:64]]).t() @ torch.cat([X, X[:64]]) / (X.shape[0] + 64),
                               rtol=1e-5, atol=1e-4)
