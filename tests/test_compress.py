"""End to end on tiny random models of every family: compress-on-load, exact sparsity, N:M, INT4, skips,
save -> fresh-process reload with bit-identical weights and logits and no calibration."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import UNIFORM, CALIBRATION_TEXT, FAMILIES, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress
from optimum_sparsesched.pipeline.plan import weight_matrix
from optimum_sparsesched.formats.compact import unpack_mask



def compressed_modules(model, cfg):
    modules = dict(model.named_modules())
    return {name: modules[name] for name in cfg.results.layer_sparsities}


@pytest.mark.parametrize("family", FAMILIES)
def test_unstructured_sparsity_per_module(family, tokenizer):
    model = tiny_model(family)
    cfg = SparseScheduleConfig(sparsity=0.6, **UNIFORM)
    compress(model, cfg, tokenizer=tokenizer)
    modules = compressed_modules(model, cfg)
    assert len(modules) >= 4 * 2
    for name, m in modules.items():
        zeros = (m.weight == 0).float().mean().item()
        assert abs(zeros - 0.6) < 1e-3, name
        assert cfg.results.layer_sparsities[name] == pytest.approx(zeros)
        assert torch.isfinite(m.weight).all()
    assert model.config.quantization_config is cfg
    assert set(cfg.results.layer_errors) == set(cfg.results.layer_sparsities)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_per_module(family, pattern, tokenizer):
    n, m_ = map(int, pattern.split(":"))
    model = tiny_model(family)
    cfg = SparseScheduleConfig(sparsity=n / m_, pattern=pattern, **UNIFORM)
    compress(model, cfg, tokenizer=tokenizer)
    for name, m in compressed_modules(model, cfg).items():
        W = weight_matrix(m)
        zeros_per_group = (W == 0).reshape(W.shape[0], -1, m_).sum(-1)
        assert (zeros_per_group >= n).all(), name


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_joint_int4_groups(family, tokenizer):
    model = tiny_model(family)
    cfg = SparseScheduleConfig(sparsity=0.5, bits=4, group_size=32, **UNIFORM)
    compress(model, cfg, tokenizer=tokenizer)
    for name, m in compressed_modules(model, cfg).items():
        W = weight_matrix(m)
        assert (W == 0).float().mean() >= 0.5 - 1e-3
        for group in W.reshape(W.shape[0], -1, 32).reshape(-1, 32):
            assert torch.unique(group[group != 0]).numel() <= 16, name


def test_lm_head_embeddings_and_skips_untouched(tokenizer):
    model = tiny_model("llama", tie_word_embeddings=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SparseScheduleConfig(sparsity=0.5, modules_to_not_convert=["lm_head", "mlp.down_proj"], **UNIFORM)
    compress(model, cfg, tokenizer=tokenizer)
    after = model.state_dict()
    untouched = [k for k in before if torch.equal(before[k], after[k])]
    assert "lm_head.weight" in untouched and "model.embed_tokens.weight" in untouched
    assert all(f"model.layers.{i}.mlp.down_proj.weight" in untouched for i in range(2))
    assert not any("down_proj" in n for n in cfg.results.layer_sparsities)
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


def test_compression_reduces_to_calibration_seeded(tokenizer):
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    compress(a, SparseScheduleConfig(sparsity=0.5, seed=3, **UNIFORM), tokenizer=tokenizer)
    compress(b, SparseScheduleConfig(sparsity=0.5, seed=3, **UNIFORM), tokenizer=tokenizer)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_from_pretrained_then_reload_in_fresh_process(family, save_tiny, tmp_path):
    path = save_tiny(family)
    cfg = SparseScheduleConfig(sparsity=0.5, bits=4, group_size=32, **UNIFORM)  # tokenizer: the model's own path
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    sp = model.config.quantization_config.results.layer_sparsities
    assert sp and all(0.499 <= v < 0.6 for v in sp.values())  # INT4 may round a few kept weights to 0
    out = tmp_path / "compressed"
    model.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "sparse_schedule" and saved["results"]["layer_sparsities"] == sp
    ids = torch.randint(1, 500, (1, 24), generator=torch.Generator().manual_seed(0))
    torch.save({"ids": ids, "logits": model(input_ids=ids).logits, "state": model.state_dict()}, tmp_path / "ref.pt")
    script = textwrap.dedent(f"""
        import torch, optimum_sparsesched, optimum_sparsesched.quantizer as q
        from transformers import AutoModelForCausalLM
        def no_calibration(*a, **k): raise AssertionError("reload must not calibrate")
        q.compress_blocks = no_calibration
        ref = torch.load(r"{tmp_path / 'ref.pt'}")
        m = AutoModelForCausalLM.from_pretrained(r"{out}")
        assert m.config.quantization_config.results.layer_sparsities == {sp!r}
        state = m.state_dict()
        for k, v in ref["state"].items():
            assert torch.equal(state[k], v), k
        assert torch.equal(m(input_ids=ref["ids"]).logits, ref["logits"])
        print("RELOAD_OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "RELOAD_OK" in result.stdout, result.stderr[-3000:]


def test_saved_weights_are_the_compressed_ones(save_tiny, tmp_path):
    path = save_tiny("opt")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=SparseScheduleConfig(sparsity=0.7, **UNIFORM))
    model.save_pretrained(tmp_path / "out")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    modules = dict(model.named_modules())
    for name in model.config.quantization_config.results.layer_sparsities:
        nonzero = unpack_mask(tensors[name + ".weight_mask"], modules[name].in_features)
        assert abs(1 - nonzero.float().mean().item() - 0.7) < 1e-3
        assert torch.equal(tensors[name + ".weight_values"], modules[name].weight[nonzero])
