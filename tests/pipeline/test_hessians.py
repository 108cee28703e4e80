"""Hessian capture: H = 2XXᵀ/n in float32, shared between modules that read the same input."""

import pytest
import torch

from conftest import block_visit, tiny_model
from optimum_sparsesched.pipeline.blocks import capture_block_inputs, find_decoder_blocks
from optimum_sparsesched.pipeline.hessians import HessianAccumulator, collect_block_hessians, input_groups


def test_non_finite_activations_raise():
    acc = HessianAccumulator(8, torch.device("cpu"))
    with pytest.raises(FloatingPointError):
        acc.add_batch(torch.tensor([[float("nan")] * 8]))


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
def test_groups_come_in_forward_order(family):
    model = tiny_model(family)
    inputs = capture_block_inputs(model, torch.randint(1, 500, (2, 16)), "cpu")
    with block_visit(model, inputs) as visit:
        order = []
        handles = [m.register_forward_hook(lambda m, a, o, n=n: order.append(n)) for n, m in visit.modules.items()]
        visit.forward(inputs.hidden[0])
        for h in handles:
            h.remove()
        groups = input_groups(visit, inputs.hidden[0])
    assert sorted(sum(groups, [])) == sorted(visit.modules) and len(groups) >= 3
    firsts = [g[0] for g in groups]
    assert firsts == sorted(firsts, key=order.index)  # the order the forward reaches them
