"""A compressed checkpoint loads the ways transformers users load models: any float ``dtype`` and ``"auto"``, any
``device_map``, ``generate``, ``pipeline("text-generation")``, and the CLI's ``compress --dtype X`` then ``eval OUT``.

The matrix (save dtype × load dtype × export format × bits) is checked against the decoded dense reference: every
weight of the loaded model equals the checkpoint's weight decoded in float32 and cast once to the loaded dtype — bit
for bit, so equal to the saved model when the dtypes are equal — and ``run_compressed`` gives the decoded model's
logits bit for bit. compressed-tensors decodes in its own way: its weights are checked within the loaded dtype's
rounding."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import UNIFORM, load_run_compressed, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress
from optimum_sparsesched.cli import main
from optimum_sparsesched.formats import sparse_kernel
from optimum_sparsesched.formats.compact import decode_weight

FAST = {**UNIFORM, "preset": "sparsegpt"}
LOAD_DTYPES = [torch.float32, torch.bfloat16, torch.float16, "auto"]
GRID = dict(group_size=32, sym=True)


@functools.lru_cache(maxsize=4)
def stored_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def reference_weights(folder, model, dtype, bits) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` as the checkpoint in ``folder`` defines it, decoded in float32 and cast once to
    ``dtype`` (the decoded dense reference)."""
    stored = stored_tensors(folder)
    out = {}
    for name, param in model.named_parameters():
        module = name.rpartition(".")[0]
        if f"{module}.weight_mask" in stored and name.endswith(".weight"):
            tensors = {k.rpartition(".")[2]: v for k, v in stored.items() if k.startswith(module + ".weight")}
            out[name] = decode_weight(tensors, tuple(param.shape), torch.float32, bits, GRID["group_size"],
                                      GRID["sym"])[0].to(dtype)
        elif name in stored:
            out[name] = stored[name].to(dtype)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """``(family, save dtype, bits) -> {export format: folder}``: one compression in float32 per family and bits,
    saved in every format, then cast to bfloat16 (grid values stay on their grid, zeros stay zeros) and saved
    again."""
    cache: dict = {}

    def get(family, save_dtype, bits):
        if (family, save_dtype, bits) not in cache:
            model = tiny_model(family, tie_word_embeddings=False)
            cfg = SparseScheduleConfig(sparsity=0.6, bits=bits, **GRID, **FAST)
            compress(model, cfg, tokenizer=tokenizer)
            formats = ["compact", "dense"] + (["compressed-tensors"] if bits else [])
            for dtype in (torch.float32, torch.bfloat16):
                root = tmp_path_factory.mktemp(f"{family}-{str(dtype)[6:]}-{bits}")
                model.to(dtype)
                for fmt in formats:
                    cfg.export_format = fmt
                    model.save_pretrained(root / fmt)
                    tokenizer.save_pretrained(root / fmt)
                cache[family, dtype, bits] = {fmt: root / fmt for fmt in formats}
        return cache[family, save_dtype, bits]

    return get


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("save_dtype", [torch.float32, torch.bfloat16])
def test_every_dtype_loads_every_format_as_the_decoded_reference(family, bits, save_dtype, checkpoints):
    folders = checkpoints(family, save_dtype, bits)
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    for fmt, folder in folders.items():
        for load in LOAD_DTYPES:
            want = save_dtype if load == "auto" else load
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=load)
            where = f"{fmt} saved {save_dtype} loaded {load}"
            assert model.dtype == want, where
            logits = model(ids).logits
            assert logits.dtype == want and torch.isfinite(logits).all(), where
            if fmt == "compressed-tensors":  # its own decoder (run by the forward above): within the dtype's rounding
                reference = reference_weights(folders["compact"], model, want, bits)
                compressed = json.loads((folder / "config.json").read_text())["sparse_schedule_config"]["results"]
                eps = torch.finfo(want).eps
                for module in compressed["layer_sparsities"]:
                    got = model.get_submodule(module).weight
                    assert got.dtype == want, (where, module)
                    torch.testing.assert_close(got.float(), reference[f"{module}.weight"].float(), rtol=2 * eps,
                                               atol=0.0)
                continue
            for name, ref in reference_weights(folder, model, want, bits).items():
                param = model.get_parameter(name)
                assert param.dtype == want and torch.equal(param, ref), (where, name)
            if fmt == "compact":  # run_compressed: the same logits bit for bit
                assert torch.equal(load_run_compressed(folder, dtype=load)(ids).logits, logits), where


@pytest.mark.parametrize("device_map", ["auto", "cpu", "dict"])
def test_device_maps(device_map, checkpoints):
    folder = checkpoints("llama", torch.float32, 4)["compact"]
    plain = AutoModelForCausalLM.from_pretrained(folder)
    if device_map == "dict":  # one entry per top-level part, as accelerate's maps name them
        device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                      "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    ids = torch.arange(16)[None]
    expected = plain(ids).logits
    for model in (AutoModelForCausalLM.from_pretrained(folder, device_map=device_map),
                  load_run_compressed(folder, device_map=device_map)):
        assert model.device.type == "cpu"
        assert torch.equal(model(ids).logits, expected)
    kernel = load_run_compressed(folder, run_compressed="int4", device_map=device_map)  # the same float32 weights
    torch.testing.assert_close(kernel(ids).logits, expected, rtol=1e-4, atol=1e-4)       # summed in another order
    if sparse_kernel.unavailable_reason() is None:  # the compiled sparse kernel for a one-token step
        fast = load_run_compressed(folder, run_compressed="sparse", device_map=device_map)
        assert fast.device.type == "cpu" and torch.equal(fast(ids).logits, expected)
        torch.testing.assert_close(fast(ids[:, :1]).logits, plain(ids[:, :1]).logits, rtol=1e-4, atol=1e-4)


def test_generate_and_pipeline_after_import(checkpoints, tokenizer):
    folder = checkpoints("llama", torch.bfloat16, 4)["compact"]
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tokenizer("The history of", return_tensors="pt").input_ids
    greedy = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(load_run_compressed(folder).generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False),
                       greedy)
    generator = transformers.pipeline("text-generation", model=str(folder))
    out = generator("The history of", max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert generator.model.dtype == torch.bfloat16  # the saved dtype, as for any checkpoint
    assert out[0]["generated_text"] == tokenizer.decode(greedy[0], skip_special_tokens=True)


def test_cli_compress_in_bfloat16_then_eval_with_and_without_dtype(save_tiny, tmp_path, capsys):
    from conftest import CALIBRATION_TEXT

    src, out = save_tiny("llama"), tmp_path / "out"
    assert main(["compress", str(src), str(out), "--dtype", "bfloat16", "--sparsity", "0.5", "--bits", "4",
                 "--group-size", "32", "--schedule", "uniform", "--preset", "sparsegpt", "--dataset",
                 str(CALIBRATION_TEXT), "--num-samples", "4", "--seq-len", "64", "--json"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    capsys.readouterr()
    figures = {}
    for extra in ([], ["--dtype", "bfloat16"], ["--dtype", "auto"], ["--dtype", "float16"],
                  ["--dtype", "bfloat16", "--run-compressed"], ["--run-compressed"], ["--run-compressed", "int4"],
                  ["--dtype", "bfloat16", "--run-compressed", "int4"], ["--run-compressed", "sparse"]):
        assert main(["eval", str(out), "--seq-len", "64", "--max-windows", "2", "--json", *extra]) == 0, extra
        figures[" ".join(extra)] = json.loads(capsys.readouterr().out)["perplexity"]
    assert figures["--dtype bfloat16"] == figures["--dtype auto"] == figures["--dtype bfloat16 --run-compressed"]
    assert figures[""] == figures["--run-compressed"] == figures["--run-compressed sparse"]  # float32, decoded or
    # kept compact (64-token windows: the sparse kernel's steps are decodes of up to 8 tokens)
    assert abs(figures["--run-compressed int4"] / figures[""] - 1) < 1e-4  # the same weights, another summation
    assert all(abs(v / figures[""] - 1) < 0.02 for v in figures.values()), figures
    assert main(["eval", str(src), "--run-compressed"]) == 2
    err = capsys.readouterr().err  # a dense model: nothing to keep compact
    assert "--run-compressed: " in err and "is not a checkpoint in this package's compact format" in err, err
