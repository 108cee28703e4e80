"""run_compressed="int4": 4-bit compact Linears run by torch's CPU int4 matmul — the same float32 weights as the
decoded model (pruned weights exactly 0), the checkpoint's tensors rebuilt exactly for a save and a decode, modules
the kernel cannot take left compact, refused for checkpoints without 4-bit codes before loading."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import UNIFORM, load_run_compressed, round_to_grid, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress
from optimum_sparsesched.formats import int4_kernel
from optimum_sparsesched.formats.compact import decode_weight, encode_weight
from optimum_sparsesched.formats.compressed_linear import CompressedLinear

FAST = {**UNIFORM, "preset": "sparsegpt"}


def compressed_linear(rows, cols, group_size, sym, density, seed=0, bits=4):
    g = torch.Generator().manual_seed(seed)
    w, grid = round_to_grid(torch.randn(rows, cols, generator=g), bits, group_size, sym)
    w[torch.rand(rows, cols, generator=g) >= density] = 0
    tensors = encode_weight(w, grid, bits, group_size, sym)
    module = CompressedLinear(cols, rows, {k: v for k, v in tensors.items() if k != "weight"}, torch.float32, bits,
                              group_size, sym, bias=torch.randn(rows, generator=g))
    return module, tensors, w


@pytest.mark.parametrize("rows,cols,group_size,sym,density", [
    (16, 64, 32, False, 0.3), (32, 96, 32, True, 0.5), (48, 128, -1, False, 0.0), (16, 256, 64, True, 1.0),
    (64, 192, 64, False, 0.3), (16, 512, 256, False, 0.7), (16, 1280, 128, False, 0.3)])  # 1280: read back in 2 chunks
def test_the_kernel_computes_the_decoded_weights_and_gives_the_tensors_back(rows, cols, group_size, sym, density):
    module, tensors, w = compressed_linear(rows, cols, group_size, sym, density)
    x = torch.randn(5, 3, cols, generator=torch.Generator().manual_seed(1))
    assert module.use_int4_kernel() and module.kernel_group == int4_kernel.kernel_group(rows, cols, group_size)
    assert not hasattr(module, "weight_codes") and module.has_codes
    saved = {k for k in tensors if k != "weight_codes"} | {"bias", "weight"}
    assert set(module.state_dict()) == saved  # the kernel's buffers are not saved
    expected = torch.nn.functional.linear(x, w, module.bias)
    # the same float32 weights, summed in another order: the rounding grows with the √cols terms of a sum
    # (a code off by one would move an output by a quantization step, ~0.1 here)
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-5 * (cols / 64) ** 0.5)
    again = module.compact_tensors()
    assert again.keys() - {"weight"} == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert torch.equal(module.decode(), decode_weight(tensors, (rows, cols), torch.float32, 4, group_size, sym)[0])
    codes = int4_kernel.kernel_codes(module.int4_codes, module.kernel_group, rows, cols)
    assert codes.shape == (rows, cols) and int(codes.max()) <= 15
    module.to(torch.bfloat16)  # a dtype cast keeps the grid's scale; the kernel's are rebuilt for bfloat16
    assert module.weight_scale.dtype == torch.bfloat16
    xb = x.to(torch.bfloat16)
    got = module(xb)
    assert got.dtype == torch.bfloat16 and module.int4_scale_zero.dtype == torch.bfloat16
    step = module.weight_scale.float().max()  # weights rounded to bfloat16 by the kernel: within s/64 each
    reference = torch.nn.functional.linear(xb.float(), w, module.bias.float())
    bound = xb.float().abs().sum(-1, keepdim=True) * step / 64 + reference.abs() * 2**-7 + 1e-3
    assert ((got.float() - reference).abs() <= bound).all()
    module.to(torch.float32)  # and back: the exact float32 scales again
    assert module(x).dtype == torch.float32 and module.int4_scale_zero.dtype == torch.float32
    round_trip = torch.nn.functional.linear(x, w, module.bias)  # the bias went through bfloat16 and back
    torch.testing.assert_close(module(x), round_trip, rtol=1e-5, atol=1e-5 * (cols / 64) ** 0.5)
    out = module(xb.requires_grad_())  # a forward under autograd works; a backward through the kernel does not
    with pytest.raises(RuntimeError, match="_weight_int4pack_mm"):
        out.sum().backward()


@pytest.mark.parametrize("rows,cols,group_size,bits", [(8, 64, 32, 4), (16, 48, 24, 4), (16, 64, 32, 8),
                                                         (16, 40, -1, 4)])
def test_modules_the_kernel_cannot_take_stay_compact(rows, cols, group_size, bits):
    module, tensors, w = compressed_linear(rows, cols, group_size, False, 0.5, bits=bits)
    assert not module.use_int4_kernel() and module.kernel_group is None and hasattr(module, "weight_codes")
    x = torch.randn(2, cols)
    assert torch.equal(module(x), torch.nn.functional.linear(x, module.decode(), module.bias))


@pytest.fixture(scope="module")
def int4_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("int4-g32")
    model = tiny_model("llama")
    compress(model, SparseScheduleConfig(sparsity=0.6, bits=4, group_size=32, **FAST), tokenizer=tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_checkpoint_loaded_with_the_int4_kernel(int4_folder, tmp_path):
    decoded = AutoModelForCausalLM.from_pretrained(int4_folder)
    model = load_run_compressed(int4_folder, run_compressed="int4")
    kept = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert kept and all(m.kernel_group == 32 for m in kept.values())
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids).logits, decoded(ids).logits, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "again")  # the checkpoint again, tensor for tensor
    stored, again = (load_file(f / "model.safetensors") for f in (int4_folder, tmp_path / "again"))
    assert again.keys() == stored.keys() and all(torch.equal(again[k], stored[k]) for k in stored)
    plain = model.dequantize()
    assert all(torch.equal(v, decoded.state_dict()[k]) for k, v in plain.state_dict().items())
    bf16 = load_run_compressed(int4_folder, run_compressed="int4", dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(int4_folder, dtype=torch.bfloat16)
    torch.testing.assert_close(bf16(ids).logits.float(), reference(ids).logits.float(), rtol=0.05, atol=0.05)


def test_int4_is_refused_without_4_bit_codes_and_unknown_layouts_are_refused(tmp_path, tokenizer):
    model = tiny_model("llama")
    compress(model, SparseScheduleConfig(sparsity=0.6, **FAST), tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "values")
    with pytest.raises(ValueError, match=r"run_compressed='int4'.*bits=None"):
        load_run_compressed(tmp_path / "values", run_compressed="int4")
    for bad in ("fast", 1, "INT4"):
        with pytest.raises(ValueError, match=r"run_compressed.*'compact', 'int4' or 'sparse'"):
            SparseScheduleConfig(run_compressed=bad)
    with pytest.raises(ValueError, match="run_compressed"):
        compress(tiny_model("llama"), SparseScheduleConfig(run_compressed="int4", **FAST), tokenizer=tokenizer)
