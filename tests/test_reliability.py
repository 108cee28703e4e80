"""Reliability: resumable runs and numerical faults. Saves: tests/publish/test_save.py; resume state checks:
tests/pipeline/test_checkpoint.py; compact checkpoint checks and loading without the plugin:
tests/formats/test_compact_integrity.py."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from conftest import solve, SMALL, CALIBRATION_TEXT, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress

TESTS = Path(__file__).parent

RUN = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_model
    from transformers import AutoTokenizer
    import optimum_sparsesched.pipeline.checkpoint as ck
    from optimum_sparsesched import SparseScheduleConfig, compress
    kill_after = int(sys.argv[1])
    original = ck.BlockCheckpoint.save_block
    def save_block(self, manifest, index, *a, **k):
        original(self, manifest, index, *a, **k)
        print(f"saved block {{index}}", flush=True)
        if index == kill_after:
            os._exit(9)  # killed right after block `index` was saved
    ck.BlockCheckpoint.save_block = save_block
    model = tiny_model("llama", num_hidden_layers=4)
    cfg = SparseScheduleConfig(sparsity=0.7, checkpoint_dir=sys.argv[2], **{small!r})
    compress(model, cfg, tokenizer=AutoTokenizer.from_pretrained(sys.argv[3]))
    torch.save({{"state": model.state_dict(), "sparsities": cfg.results.layer_sparsities}}, sys.argv[4])
""")


def test_killed_run_resumes_to_identical_weights(tmp_path, tokenizer_dir, tokenizer):
    script = tmp_path / "run.py"
    script.write_text(RUN.format(tests=str(TESTS), small=SMALL))
    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed.pt"
    killed = subprocess.run([sys.executable, str(script), "1", str(ckpt), str(tokenizer_dir), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert killed.stdout.split() == "saved block 0 saved block 1".split()
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["finished_blocks"] == 2 and not out.exists()
    resumed = subprocess.run([sys.executable, str(script), "-1", str(ckpt), str(tokenizer_dir), str(out)],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.split() == "saved block 2 saved block 3".split()  # blocks 0 and 1 came from the checkpoint
    assert json.loads((ckpt / "manifest.json").read_text())["finished_blocks"] == 4

    reference = tiny_model("llama", num_hidden_layers=4)
    cfg = SparseScheduleConfig(sparsity=0.7, **SMALL)
    compress(reference, cfg, tokenizer=tokenizer)
    got = torch.load(out)
    assert got["sparsities"] == pytest.approx(cfg.results.layer_sparsities)
    for k, v in reference.state_dict().items():
        assert torch.equal(got["state"][k], v), k


def test_fingerprint_mismatch_refuses_to_resume(tmp_path, tokenizer):
    ckpt = tmp_path / "ckpt"
    compress(tiny_model("llama"), SparseScheduleConfig(sparsity=0.5, checkpoint_dir=str(ckpt), **SMALL),
             tokenizer=tokenizer)
    with pytest.raises(ValueError, match="checkpoint_dir.*refusing to resume"):
        compress(tiny_model("llama"), SparseScheduleConfig(sparsity=0.6, checkpoint_dir=str(ckpt), **SMALL),
                 tokenizer=tokenizer)


@pytest.mark.parametrize("bits", [None, 4])
def test_finished_checkpoint_is_reused_without_recompression(bits, tmp_path, tokenizer):
    ckpt = tmp_path / "ckpt"
    a = tiny_model("opt")
    compress(a, SparseScheduleConfig(sparsity=0.5, bits=bits, checkpoint_dir=str(ckpt), **SMALL), tokenizer=tokenizer)
    b = tiny_model("opt")
    compress(b, SparseScheduleConfig(sparsity=0.5, bits=bits, checkpoint_dir=str(ckpt), **SMALL), tokenizer=tokenizer)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    b.save_pretrained(tmp_path / "out")  # the resumed model carries its quantization grids into the compact format
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(x, reloaded.state_dict()[k]) for k, x in a.state_dict().items())


def test_a_non_finite_source_weight_is_named_before_any_work(tokenizer):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("inf")
    cfg = SparseScheduleConfig(sparsity=0.5, schedule="uniform", **SMALL)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight holds 0 NaN and 1 Inf"):
        compress(model, cfg, tokenizer=tokenizer)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(-20, 20), st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([None, 4]),
       st.booleans())
def test_no_weight_is_ever_nan_or_inf(seed, log_scale, sparsity, bits, rank_deficient):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(8, 32, generator=g) * float(torch.exp(torch.tensor(log_scale)))
    X = torch.randn(64 if not rank_deficient else 3, 32, generator=g) * float(torch.exp(torch.tensor(log_scale / 2)))
    H = 2 * X.t() @ X / X.shape[0]
    result = solve(W, H, sparsity, bits=bits, group_size=16, block_size=16)
    Q, loss = result.weight, result.loss
    assert torch.isfinite(Q).all()
