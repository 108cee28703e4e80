"""The compact checkpoint format: bit packing round trips, lossless reload on every family and grid, sizes, shards,
re-saving a reloaded model, and the `dense` export."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import UNIFORM, CALIBRATION_TEXT, FAMILIES, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress
from optimum_sparsesched.formats.compact import (
    decode_weight,
    encode_weight,
    pack_codes,
    pack_mask,
    unpack_codes,
    unpack_mask,
)
from optimum_sparsesched.obs.grid import QuantGrid, round_up_to_bfloat16



def tensors_in(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 40), seed=st.integers(0, 10**6))
def test_mask_and_code_packing_round_trip(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < 0.4
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, -(-cols // 8))
    assert torch.equal(unpack_mask(packed, cols), mask)
    for bits in (4, 8):
        codes = torch.randint(0, 2**bits, (rows * cols,), generator=g)
        packed = pack_codes(codes, bits)
        assert packed.numel() == -(-rows * cols * bits // 8)
        assert torch.equal(unpack_codes(packed, bits, codes.numel()), codes.to(torch.uint8))


def test_mask_bit_order_is_documented_little_endian():
    mask = torch.tensor([[True, False, False, False, False, False, False, False, False, True]])
    assert pack_mask(mask).tolist() == [[1, 2]]


def test_round_up_to_bfloat16():
    x = torch.tensor([1.0, 1.0 + 2**-10, 3.3e-7, 0.0123, 7.5e4])
    up = round_up_to_bfloat16(x)
    assert torch.equal(up, up.to(torch.bfloat16).to(torch.float32))  # representable
    assert (up >= x).all() and ((up - x) / x < 2**-7).all()
    assert up[0] == 1.0


@pytest.mark.parametrize("bits,sym,group_size", [(4, False, 16), (4, True, 16), (8, False, -1), (8, True, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_encode_decode_grid_weights_bit_exact(bits, sym, group_size, dtype):
    torch.manual_seed(0)
    W = torch.randn(12, 40)
    grid = QuantGrid(bits, sym)
    scales, zeros = [], []
    Q = torch.empty_like(W)
    step = W.shape[1] if group_size == -1 else group_size
    for c in range(0, W.shape[1], step):
        grid.find_params(W[:, c:c + step])
        scales.append(grid.scale), zeros.append(grid.zero)
        Q[:, c:c + step] = grid.quantize(W[:, c:c + step])
    Q[torch.rand_like(Q) < 0.5] = 0
    Q = Q.to(dtype)
    enc = encode_weight(Q, (torch.cat(scales, 1), torch.cat(zeros, 1)), bits, group_size, sym)
    assert ("weight_zero" in enc) == (not sym)
    dec, (scale, zero) = decode_weight(enc, tuple(Q.shape), dtype, bits, group_size, sym)
    assert dec.dtype == dtype and torch.equal(dec, Q)
    assert torch.equal(scale, torch.cat(scales, 1)) and torch.equal(zero, torch.cat(zeros, 1))


def test_encode_refuses_weights_off_the_grid():
    W = torch.tensor([[0.0, 0.3, 0.7, 1.0]])
    grid = (torch.tensor([[0.25]]), torch.tensor([[0.0]]))
    with pytest.raises(ValueError, match="not on their 4-bit grid"):
        encode_weight(W, grid, 4, -1, False)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits,dtype", [(None, torch.float32), (4, torch.bfloat16), (8, torch.bfloat16)])
def test_compact_checkpoint_reloads_bit_identical(family, bits, dtype, tokenizer, tmp_path):
    model = tiny_model(family, dtype=dtype)
    cfg = SparseScheduleConfig(sparsity=0.6, bits=bits, group_size=32, **UNIFORM)
    compress(model, cfg, tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "out")
    stored = tensors_in(tmp_path / "out")
    for name in cfg.results.layer_sparsities:
        assert stored[f"{name}.weight"].numel() == 0 and f"{name}.weight_mask" in stored, name  # the placeholder
        assert (f"{name}.weight_codes" in stored) == (bits is not None)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert saved["export_format"] == "compact"

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_reloaded_compact_model_saves_the_same_tensors(tokenizer, tmp_path):
    model = tiny_model("llama", dtype=torch.bfloat16)
    compress(model, SparseScheduleConfig(sparsity=0.5, bits=4, group_size=16, **UNIFORM), tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "a")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    name = next(iter(reloaded.config.quantization_config.results.layer_sparsities))
    assert name in reloaded.config.quantization_config.results.grids  # the grid came back with the weights
    reloaded.save_pretrained(tmp_path / "b")
    a, b = tensors_in(tmp_path / "a"), tensors_in(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_compact_checkpoint(tokenizer, tmp_path):
    model = tiny_model("qwen2", dtype=torch.bfloat16)
    compress(model, SparseScheduleConfig(sparsity=0.7, bits=4, group_size=32, **UNIFORM), tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "out", max_shard_size="20KB")
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_compact_is_smaller_and_dense_export_is_plain(tokenizer, tmp_path):
    def decoder_bytes(folder):
        return sum(t.numel() * t.element_size() for k, t in tensors_in(folder).items() if ".layers." in k
                   and ("proj" in k) and "bias" not in k)

    sizes = {}
    for fmt, bits in [("dense", None), ("compact", None), ("compact", 4)]:
        model = tiny_model("llama", dtype=torch.bfloat16, intermediate_size=256, hidden_size=128)
        cfg = SparseScheduleConfig(sparsity=0.7, bits=bits, group_size=128, export_format=fmt, **UNIFORM)
        compress(model, cfg, tokenizer=tokenizer)
        model.save_pretrained(tmp_path / f"{fmt}{bits}")
        sizes[fmt, bits] = decoder_bytes(tmp_path / f"{fmt}{bits}")
        if fmt == "dense":
            stored = tensors_in(tmp_path / "denseNone")
            assert all(f"{n}.weight" in stored for n in cfg.results.layer_sparsities)
            assert not any(k.endswith("weight_mask") for k in stored)
            reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "denseNone")
            assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    dense = sizes["dense", None]
    # 1 bit of mask + 16 bits for 30% of the weights; 1 + 4·0.3 bits + a bf16 scale and 8-bit zero per 128
    assert sizes["compact", None] / dense == pytest.approx((1 + 16 * 0.3) / 16, abs=0.02)
    assert sizes["compact", 4] / dense <= 0.15


def test_export_format_validation():
    with pytest.raises(ValueError, match="export_format"):
        SparseScheduleConfig(export_format="gguf")
    with pytest.raises(ValueError, match="export_format.*bits"):
        SparseScheduleConfig(export_format="compressed-tensors")


CT_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
assert "optimum_sparsesched" not in sys.modules
folder, expected_path, dequantize = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
assert "optimum_sparsesched" not in sys.modules
expected = torch.load(expected_path)
ids = torch.arange(24)[None] % model.config.vocab_size
logits = model(ids).logits
assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
if dequantize:
    state = model.state_dict()
    for key, value in expected["state"].items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
print("OK", type(model.get_submodule(expected["name"])).__name__)
"""


@pytest.mark.parametrize("bits,sym,group_size", [(4, True, 32), (4, False, 32), (8, False, -1)])
def test_compressed_tensors_export_loads_in_plain_transformers(bits, sym, group_size, tokenizer, tmp_path):
    import subprocess
    import sys

    model = tiny_model("llama", dtype=torch.bfloat16, tie_word_embeddings=False)
    cfg = SparseScheduleConfig(sparsity=0.6, bits=bits, sym=sym, group_size=group_size,
                               export_format="compressed-tensors", **UNIFORM)
    compress(model, cfg, tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "ct")
    saved = json.loads((tmp_path / "ct" / "config.json").read_text())
    q = saved["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    assert "lm_head" in q["ignore"] and saved["sparse_schedule_config"]["sparsity"] == 0.6
    stored = tensors_in(tmp_path / "ct")
    name = next(iter(cfg.results.layer_sparsities))
    assert stored[f"{name}.weight_packed"].dtype == torch.int32
    assert (f"{name}.weight_zero_point" in stored) == (not sym)
    ids = torch.arange(24)[None] % model.config.vocab_size
    torch.save({"logits": model(ids).logits, "state": model.state_dict(), "name": name}, tmp_path / "expected.pt")
    # asymmetric pack-quantized checkpoints (also llm-compressor's) load in transformers only with dequantize=True
    # (packed zero points, llm-compressor#1618); symmetric ones load either way
    for dequantize in ([True, False] if sym else [True]):
        result = subprocess.run([sys.executable, "-c", CT_LOAD, str(tmp_path / "ct"), str(tmp_path / "expected.pt"),
                                 str(int(dequantize))], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_compressed_tensors_export_refuses_conv1d_before_work(tokenizer):
    model = tiny_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="export_format.*nn.Linear"):
        compress(model, SparseScheduleConfig(sparsity=0.5, bits=4, export_format="compressed-tensors", **UNIFORM),
                 tokenizer=tokenizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
