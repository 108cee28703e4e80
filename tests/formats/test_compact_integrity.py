"""A compact checkpoint never loads wrong weights: every tensor is checked against the mask, the shapes and the
config before decoding, edits of the grid options in config.json and a config.json of another save are refused,
and plain transformers (without this package) refuses the checkpoint instead of loading random layers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from conftest import UNIFORM, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress
from optimum_sparsesched.formats.compact import REQUIRES_PLUGIN_KEY, decode_weight, encode_weight
from optimum_sparsesched.obs.grid import QuantGrid


def quantized(rows=6, cols=40, bits=4, group_size=16, sym=False):
    """A pruned weight on its grid and its compact tensors."""
    torch.manual_seed(0)
    W = torch.randn(rows, cols)
    grid = QuantGrid(bits, sym)
    scales, zeros, Q = [], [], torch.empty_like(W)
    for c in range(0, cols, group_size):
        grid.find_params(W[:, c:c + group_size])
        scales.append(grid.scale), zeros.append(grid.zero)
        Q[:, c:c + group_size] = grid.quantize(W[:, c:c + group_size])
    Q[torch.rand_like(Q) < 0.5] = 0
    return Q, encode_weight(Q, (torch.cat(scales, 1), torch.cat(zeros, 1)), bits, group_size, sym)


def cut(t, n=1):
    return t.reshape(-1)[:n].clone()


TAMPERING = {  # name -> (change to the tensors, decode options, tensor the error names)
    "values cut to one element": (lambda t: {**t, "weight_values": cut(t["weight_values"])}, {}, "weight_values"),
    "values NaN": (lambda t: {**t, "weight_values": t["weight_values"].clone().fill_(float("nan"))}, {},
                   "weight_values"),
    "mask of another shape": (lambda t: {**t, "weight_mask": t["weight_mask"][:-1]}, {}, "weight_mask"),
    "mask bits past the last column": (lambda t: {**t, "weight_mask": t["weight_mask"] | 0x80}, {"cols": 39},
                                       "weight_mask"),
    "codes cut": ("q", lambda t: {**t, "weight_codes": t["weight_codes"][:-3]}, {}, "weight_codes"),
    "scale NaN": ("q", lambda t: {**t, "weight_scale": torch.full_like(t["weight_scale"], float("nan"))}, {},
                  "weight_scale"),
    "scale Inf": ("q", lambda t: {**t, "weight_scale": t["weight_scale"].clone().fill_(float("inf"))}, {},
                  "weight_scale"),
    "group_size edited": ("q", lambda t: t, {"group_size": 8}, "weight_scale"),
    "sym edited to True": ("q", lambda t: t, {"sym": True}, "weight_zero"),
    "zero point missing": ("q", lambda t: {k: v for k, v in t.items() if k != "weight_zero"}, {}, "weight_zero"),
    "zero points cut": ("q", lambda t: {**t, "weight_zero": t["weight_zero"][:1]}, {}, "weight_zero"),
    "bits edited to None": ("q", lambda t: t, {"bits": None}, "weight_codes"),
    "values and codes": ("q", lambda t: {**t, "weight_values": torch.ones(3)}, {}, "exactly one"),
    "an unknown tensor": ("q", lambda t: {**t, "weight_extra": torch.ones(1)}, {}, "weight_extra"),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_decoding_refuses_every_tampered_tensor(case):
    spec = TAMPERING[case]
    is_quantized = spec[0] == "q"
    change, options, named = spec[1:] if is_quantized else spec
    if is_quantized:
        Q, tensors = quantized()
        args = {"bits": 4, "group_size": 16, "sym": False}
    else:
        Q = torch.randn(6, 40)
        Q[torch.rand_like(Q) < 0.5] = 0
        tensors = encode_weight(Q)
        args = {}
    cols = options.pop("cols", Q.shape[1])
    with pytest.raises(ValueError, match=f"blk.q_proj.*{named}|{named}.*blk.q_proj|blk.q_proj: .*{named}"):
        decode_weight(change(dict(tensors)), (Q.shape[0], cols), torch.float32, **{**args, **options},
                      name="blk.q_proj")
    decoded, _ = decode_weight(tensors, tuple(Q.shape), torch.float32, **args, name="blk.q_proj")
    assert torch.equal(decoded, Q)  # the untouched tensors decode


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A compact INT4 checkpoint (asymmetric, group_size 32 over 64 inputs) and its model."""
    model = compress(tiny_model("llama"), SparseScheduleConfig(sparsity=0.5, bits=4, group_size=32, **UNIFORM),
                     tokenizer=tokenizer)
    folder = tmp_path_factory.mktemp("compact") / "out"
    model.save_pretrained(folder)
    return model, folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(folder), str(out)], check=True)
    return out


def edit_config(folder: Path, **changes) -> None:
    data = json.loads((folder / "config.json").read_text())
    data["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(data))


@pytest.mark.parametrize("changes,option", [
    ({"group_size": 48}, "group_size"),  # same number of groups over 64 inputs: only the record catches it
    ({"group_size": 16}, "group_size"), ({"sym": True}, "sym"), ({"bits": 8}, "bits"),
])
def test_an_edited_grid_in_config_json_is_refused(changes, option, saved, tmp_path):
    out = copy_of(saved[1], tmp_path)
    edit_config(out, **changes)
    with pytest.raises(ValueError, match=f"config.json: quantization_config.{option}=.*Restore {option}="):
        AutoModelForCausalLM.from_pretrained(out)


def test_a_config_json_of_another_save_is_refused(saved, tmp_path):
    out = copy_of(saved[1], tmp_path)
    results = json.loads((out / "config.json").read_text())["quantization_config"]["results"]
    name = next(iter(results["layer_sparsities"]))
    results["layer_sparsities"][name] += 0.01
    edit_config(out, results=results)
    with pytest.raises(ValueError, match="config.json and the weights come from different saves"):
        AutoModelForCausalLM.from_pretrained(out)
    results["eval_results"] = [{"metric": "perplexity", "value": 1.0, "dataset": "x", "split": None,
                                "seq_len": None}]
    results["layer_sparsities"][name] -= 0.01
    edit_config(out, results=results)  # recording an evaluation by hand is not a different save
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("tensor", ["weight_codes", "weight_scale", "weight_zero", "weight_mask"])
def test_a_flipped_byte_in_any_tensor_is_refused_naming_it(tensor, saved, tmp_path):
    out = copy_of(saved[1], tmp_path)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith(tensor))
    raw = tensors[key].contiguous().view(torch.uint8).reshape(-1)
    raw[raw.numel() // 2] ^= 0x10  # one bit of one byte
    save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match=f"model.safetensors: tensor {key} does not match the digest"):
        AutoModelForCausalLM.from_pretrained(out)


def test_a_flipped_value_byte_of_an_unquantized_compact_weight_is_refused(tokenizer, tmp_path):
    model = compress(tiny_model("llama"), SparseScheduleConfig(sparsity=0.7, **UNIFORM), tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "out")
    path = tmp_path / "out" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("weight_values"))
    tensors[key].view(torch.uint8)[3] ^= 0x40  # the case: -0.021 became -7.2e36
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match=f"tensor {key} does not match the digest"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("strip_digests", [False, True])
def test_a_compressed_module_with_its_tensors_deleted_is_refused(strip_digests, saved, tmp_path):
    out = copy_of(saved[1], tmp_path)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    module = next(k for k in tensors if k.endswith("weight_mask")).rpartition(".")[0]
    tensors = {k: v for k, v in tensors.items() if not k.startswith(module + ".")}
    if strip_digests:  # a file without the digests: the load itself finds the module missing
        metadata.pop("sparse_schedule_tensors")
    save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
    match = f"compressed module {module} are missing" if strip_digests else rf"tensor {module}\.\S+ is missing"
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("option,value", [("pattern", "2:4"), ("sparsity", 0.6), ("schedule", "owl"),
                                          ("export_format", "dense"), ("solver", "admm")])
def test_an_edited_option_in_config_json_is_refused(option, value, saved, tmp_path):
    out = copy_of(saved[1], tmp_path)
    edit_config(out, **{option: value})
    with pytest.raises(ValueError, match=f"quantization_config.{option}=.* were saved with {option}="):
        AutoModelForCausalLM.from_pretrained(out)


PLAIN_LOAD = """
import sys
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert "optimum_sparsesched" not in sys.modules
print("LOADED")
"""


def test_without_the_plugin_a_compact_checkpoint_is_refused(saved):
    run = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(saved[1])], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "TRANSFORMERS_VERBOSITY": "warning"})
    assert run.returncode != 0 and "LOADED" not in run.stdout
    assert "RuntimeError: You set `ignore_mismatched_sizes` to `False`" in run.stderr
    assert "Unknown quantization type, got sparse_schedule" in run.stderr
    assert REQUIRES_PLUGIN_KEY in run.stderr and "import_optimum_sparsesched" in REQUIRES_PLUGIN_KEY
    assert "MISMATCH" in run.stderr and "torch.Size([0])" in run.stderr


def test_without_the_plugin_a_dense_export_loads_with_a_warning(tokenizer, tmp_path):
    model = compress(tiny_model("llama"), SparseScheduleConfig(sparsity=0.5, export_format="dense", **UNIFORM),
                     tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "dense")
    torch.save(model.state_dict(), tmp_path / "expected.pt")
    script = PLAIN_LOAD.replace('print("LOADED")', 'import torch\nexpected = torch.load(sys.argv[2])\n'
                                'assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())\n'
                                'print("LOADED")')
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "dense"), str(tmp_path / "expected.pt")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRANSFORMERS_VERBOSITY": "warning"})
    assert run.returncode == 0 and "LOADED" in run.stdout, run.stderr[-2000:]
    assert "Unknown quantization type, got sparse_schedule" in run.stderr
