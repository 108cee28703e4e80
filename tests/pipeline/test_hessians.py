"""Hessian capture: H = 2XXᵀ/n in float32, shared between modules that read the same input."""

import pytest
import torch

from conftest import tiny_model
from optimum_sparsesched.pipeline.blocks import capture_block_inputs, find_decoder_blocks
from optimum_sparsesched.pipeline.hessians import HessianAccumulator, collect_block_hessians
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
