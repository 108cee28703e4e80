"""Hessian capture: H = 2XXᵀ/n in float32, shared between modules that read the same input."""

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


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_groups_read_off_the_collecting_pass_and_a_stopped_pass_give_the_same_hessians(family):
    """Without ``groups`` the Hessian pass groups the modules itself on its first window (no forward of its own);
    stopped once the last group's input is seen, its last modules never compute, and every Hessian is the one a
    complete pass with the groups of :func:`input_groups` collects, bit for bit."""
    model = tiny_model(family)
    inputs = capture_block_inputs(model, torch.randint(1, 500, (3, 16)), "cpu")
    _, blocks = find_decoder_blocks(model)
    modules = compressible_modules(blocks[0])
    groups = input_groups(blocks[0], modules, inputs, 0, "cpu", inputs.hidden[0])
    complete = collect_block_hessians(blocks[0], modules, inputs, 0, "cpu", groups=groups)
    last = modules[groups[-1][0]]
    calls = []
    handle = last.register_forward_hook(lambda m, a, o: calls.append(1))
    stopped = collect_block_hessians(blocks[0], modules, inputs, 0, "cpu", stop_early=True)
    handle.remove()
    assert not calls  # the last group's module never ran
    assert list(stopped) == list(modules)
    assert len({id(a) for a in stopped.values()}) == len(groups)
    for group in groups:
        assert all(stopped[n] is stopped[group[0]] for n in group)
        for n in group:
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
