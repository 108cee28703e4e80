"""Hessian capture: H = 2XXᵀ/n (float32 products summed in float64), shared between modules that read the same input."""

import pytest
import torch

from conftest import tiny_model
from optimum_sparsesched.pipeline.blocks import capture_block_inputs, find_decoder_blocks
from optimum_sparsesched.pipeline.hessians import HessianAccumulator, collect_block_hessians, input_groups
from optimum_sparsesched.pipeline.plan import compressible_modules


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
    modules = compressible_modules(blocks[0])
    acc = collect_block_hessians(blocks[0], modules, inputs, 0, "cpu")
    assert acc["self_attn.q_proj"] is acc["self_attn.k_proj"] is acc["self_attn.v_proj"]
    assert acc["mlp.gate_proj"] is acc["mlp.up_proj"]
    assert len({id(a) for a in acc.values()}) == 4  # qkv, o, gate/up, down
    # the shared Hessian is the one of the (common) input
    seen = []
    handle = modules["self_attn.k_proj"].register_forward_hook(lambda m, a, o: seen.append(a[0].reshape(-1, 64)))
    for h in inputs.hidden:
        blocks[0](h, *inputs.args[0], **inputs.kwargs[0])
    handle.remove()
    X = torch.cat(seen)
    torch.testing.assert_close(acc["self_attn.k_proj"].H, 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_groups_come_in_forward_order_and_a_stopped_forward_collects_the_same_hessian(family):
    model = tiny_model(family)
    inputs = capture_block_inputs(model, torch.randint(1, 500, (2, 16)), "cpu")
    _, blocks = find_decoder_blocks(model)
    modules = compressible_modules(blocks[0])
    order = []
    handles = [m.register_forward_hook(lambda m, a, o, n=n: order.append(n)) for n, m in modules.items()]
    blocks[0](inputs.hidden[0], *inputs.args[0], **inputs.kwargs[0])
    for h in handles:
        h.remove()
    groups = input_groups(blocks[0], modules, inputs, 0, "cpu", inputs.hidden[0])
    assert sorted(sum(groups, [])) == sorted(modules) and len(groups) >= 3
    firsts = [g[0] for g in groups]
    assert firsts == sorted(firsts, key=order.index)  # the order the forward reaches them
    whole = collect_block_hessians(blocks[0], modules, inputs, 0, "cpu")
    calls = []
    handle = blocks[0].register_forward_hook(lambda m, a, o: calls.append(1))  # runs only for a complete forward
    for group in groups:
        part = {n: modules[n] for n in group}
        alone = collect_block_hessians(blocks[0], part, inputs, 0, "cpu", groups=[group], stop_early=True)
        for n in group:
            assert torch.equal(alone[n].H, whole[n].H) and alone[n].n == whole[n].n
    handle.remove()
    assert len(calls) < len(groups) * len(inputs.hidden)  # the forwards stopped once the group was seen
