"""run_compressed: compressed Linears kept compact in memory, decoded inside their forward — equal to the decoded
model bit for bit (unstructured, 2:4, INT4 with groups and per channel, sym and asym, INT8; Llama, OPT and GPT-2's
Conv1D), through generate and the perplexity metric (and with run_compressed="sparse", its kernel's one-token steps
within float32 rounding); saved again tensor for tensor through the one writer; refused
when compressing."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import UNIFORM, load_run_compressed, random_compact, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress, compress_checkpoint
from optimum_sparsesched.formats import sparse_kernel
from optimum_sparsesched.formats.compressed_linear import CompressedLinear
from optimum_sparsesched.formats.fast_decode import DECODE_CHUNK, DecodePlan, decode_into

FAST = {**UNIFORM, "preset": "sparsegpt"}
VARIANTS = {
    "values": dict(sparsity=0.6),
    "2:4": dict(sparsity=0.5, pattern="2:4"),
    "int4-g24-asym": dict(sparsity=0.6, bits=4, group_size=24),
    "int4-channel-sym": dict(sparsity=0.6, bits=4, group_size=-1, sym=True),
    "int8-g32-asym": dict(sparsity=0.5, bits=8, group_size=32),
}
CASES = [("llama", v) for v in VARIANTS] + [("opt", "int4-g24-asym"), ("opt", "values"), ("gpt2", "2:4"),
                                             ("gpt2", "int4-channel-sym")]


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 45), bits=st.sampled_from([None, 4, 8]),
       group_size=st.sampled_from([-1, 1, 8, 16, 20]), sym=st.booleans(), seed=st.integers(0, 10**6),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       density=st.sampled_from([0.0, 0.05, 0.5, 0.95, 1.0]), chunk=st.sampled_from([1, 7, 50, DECODE_CHUNK]))
def test_the_fast_decoder_writes_decode_weights_bits(rows, cols, bits, group_size, sym, seed, dtype, density,
                                                     chunk):
    tensors, expected = random_compact(rows, cols, bits, group_size, sym, seed, dtype, density)
    plan = DecodePlan.of(tensors["weight_mask"], cols, group_size if bits else None, chunk=chunk)
    assert len(plan.chunks) == (-(-rows // max(1, chunk // cols)) if chunk < DECODE_CHUNK else 1)
    assert plan.nnz == int((expected != 0).sum())
    args = dict(values=tensors.get("weight_values"), codes=tensors.get("weight_codes"),
                scale=tensors.get("weight_scale"), zero=tensors.get("weight_zero"), bits=bits)
    for out in (None, torch.full((rows * cols + 3,), float("nan"), dtype=dtype)[:rows * cols]):
        got = decode_into(plan, tensors["weight_mask"], dtype, out=out, **args)
        assert got.dtype == dtype and got.is_contiguous() and torch.equal(got, expected)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """``(family, variant) -> folder`` of a compact checkpoint compressed once (float32)."""
    cache = {}

    def get(family, variant):
        if (family, variant) not in cache:
            folder = tmp_path_factory.mktemp(f"{family}-{variant}")
            model = tiny_model(family)
            compress(model, SparseScheduleConfig(**VARIANTS[variant], **FAST), tokenizer=tokenizer)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            cache[family, variant] = folder
        return cache[family, variant]

    return get


@pytest.mark.parametrize("family,variant", CASES)
def test_run_compressed_equals_the_decoded_model(family, variant, saved, tmp_path):
    folder = saved(family, variant)
    decoded, model = AutoModelForCausalLM.from_pretrained(folder), load_run_compressed(folder)
    stored = load_file(folder / "model.safetensors")
    compact = {k.rpartition(".")[0] for k in stored if k.endswith(".weight_mask")}
    kept = {n for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert kept == compact and kept  # every compactly stored module stays compact, no other
    assert not model.config.quantization_config.results.grids  # the grids stay in the modules, not beside them
    tied = set(model.all_tied_weights_keys)  # e.g. OPT's lm_head: tied to the embeddings, not saved
    assert set(model.state_dict()) - tied == stored.keys() - {k for k in stored if k.startswith("sparse_schedule.")}
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(ids).logits, decoded(ids).logits)
    if sparse_kernel.unavailable_reason() is None:  # run_compressed="sparse": the kernel for one-token steps
        fast = load_run_compressed(folder, run_compressed="sparse")
        assert all(m.sparse_kernel for m in fast.modules() if isinstance(m, CompressedLinear))
        assert torch.equal(fast(ids).logits, decoded(ids).logits)  # 24 tokens: decoded, bit for bit
        torch.testing.assert_close(fast(ids[:, :1]).logits, decoded(ids[:, :1]).logits, rtol=1e-4, atol=1e-4)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids[:1], **gen), decoded.generate(ids[:1], **gen))
    held = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.rpartition(".")[0] in kept)
    dense = sum(decoded.get_submodule(n).weight.numel() * 4 for n in kept)
    assert held < 0.75 * dense
    model.save_pretrained(tmp_path / "again")  # the one writer: the same checkpoint, tensor for tensor
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert again.keys() == stored.keys()
    assert all(again[k].dtype == stored[k].dtype and torch.equal(again[k], stored[k]) for k in stored)
    assert (tmp_path / "again" / "config.json").read_text() == (folder / "config.json").read_text()


def test_run_compressed_through_the_metric_in_other_dtypes_and_as_compressed_tensors(saved, tmp_path):
    import evaluate

    import optimum_sparsesched

    folder = saved("llama", "int4-g24-asym")
    metric = evaluate.load(optimum_sparsesched.PERPLEXITY_METRIC)
    texts = ["The tower is 324 metres tall.", "It was the first structure to reach a height of 300 metres."]
    expected = metric.compute(predictions=texts, model=str(folder))
    assert metric.compute(predictions=texts, model=str(folder), run_compressed=True) == expected
    objects = metric.compute(predictions=texts, model=load_run_compressed(folder), tokenizer=str(folder),
                             protocol="sparsegpt", seq_len=8)
    assert objects == metric.compute(predictions=texts, model=str(folder), protocol="sparsegpt", seq_len=8)
    model, decoded = load_run_compressed(folder), AutoModelForCausalLM.from_pretrained(folder)
    for fmt in ("compressed-tensors", "dense"):  # decoded weights and their grids: what the decoded model writes
        for m, where in ((model, "compact"), (decoded, "decoded")):
            m.config.quantization_config.export_format = fmt
            m.save_pretrained(tmp_path / fmt / where)
        ours, theirs = (load_file(tmp_path / fmt / w / "model.safetensors") for w in ("compact", "decoded"))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), fmt
    model.to(torch.bfloat16), decoded.to(torch.bfloat16)  # a cast after loading: the grid stays bfloat16
    module = next(m for m in model.modules() if isinstance(m, CompressedLinear))
    assert module.weight_scale.dtype == torch.bfloat16 and module.weight.dtype == torch.bfloat16
    ids = torch.arange(20)[None]
    assert torch.equal(model(ids).logits, decoded(ids).logits)
    assert torch.equal(copy.deepcopy(model)(ids).logits, decoded(ids).logits)  # the decoder's plan is not copied


def test_dequantize_and_dense_export_of_a_compact_model(saved, tmp_path):
    folder = saved("opt", "values")
    decoded = AutoModelForCausalLM.from_pretrained(folder)
    model = load_run_compressed(folder)
    model.config.quantization_config.export_format = "dense"
    model.save_pretrained(tmp_path / "dense")
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    assert not any(k.endswith("weight_mask") for k in dense)
    assert all(torch.equal(dense[k], v) for k, v in decoded.state_dict().items() if k in dense)
    as_compact = load_run_compressed(tmp_path / "dense")  # a dense export loaded compact: encoded after loading
    assert any(isinstance(m, CompressedLinear) for m in as_compact.modules())
    ids = torch.arange(16)[None]
    assert torch.equal(as_compact(ids).logits, decoded(ids).logits)
    plain = load_run_compressed(folder).dequantize()
    assert not any(isinstance(m, CompressedLinear) for m in plain.modules())
    assert all(torch.equal(v, decoded.state_dict()[k]) for k, v in plain.state_dict().items())


def test_damaged_or_missing_tensors_are_refused_compact_too(saved, tmp_path, caplog):
    folder = saved("llama", "values")
    stored = load_file(folder / "model.safetensors")
    key = next(k for k in stored if k.endswith("weight_values"))
    module = key.rpartition(".")[0]
    refusals = {"cut": ({**stored, key: stored[key][:-1].clone()}, RuntimeError, "automatic conversion"),
                "missing": ({k: v for k, v in stored.items() if not k.startswith(module + ".")}, ValueError,
                            f"compressed module {module} are missing")}
    for name, (tensors, error, match) in refusals.items():
        damaged = tmp_path / name
        damaged.mkdir()
        for f in folder.iterdir():
            if f.name != "model.safetensors":
                (damaged / f.name).write_bytes(f.read_bytes())
        save_file(tensors, str(damaged / "model.safetensors"), metadata={"format": "pt"})  # no digests to check
        for load in (AutoModelForCausalLM.from_pretrained, load_run_compressed):  # refused as the decoding load is
            caplog.clear()
            with pytest.raises(error, match=match):
                load(damaged)
            if name == "cut":  # transformers' load report shows our message, naming the tensor
                assert f"{key}: torch.float32 ({stored[key].numel() - 1},)" in caplog.text


def test_run_compressed_is_a_loading_option(save_tiny, tokenizer, tmp_path):
    cfg = SparseScheduleConfig(run_compressed=True, **FAST)
    assert cfg.get_loading_attributes() == {"run_compressed": True}
    assert "run_compressed" not in cfg.options_dict() and "run_compressed" not in cfg.fingerprint_options()
    assert "run_compressed" not in cfg.to_dict()
    assert SparseScheduleConfig.from_dict(SparseScheduleConfig(**FAST).to_dict()).run_compressed is False
    with pytest.raises(ValueError, match="run_compressed"):
        SparseScheduleConfig(run_compressed="yes")
    src = save_tiny("llama")
    with pytest.raises(ValueError, match="`run_compressed`=True .*loading option"):
        AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    with pytest.raises(ValueError, match="run_compressed"):
        compress(tiny_model("llama"), cfg, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="run_compressed"):
        compress_checkpoint(src, tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()
