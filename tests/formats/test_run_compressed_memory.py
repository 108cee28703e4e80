"""run_compressed holds less memory than the decoded model, measured in fresh processes on a synthetic compact
checkpoint: a regression that decodes every weight at load (or keeps decoded weights after the forward) makes the
resident memory of the two equal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import save_file

from conftest import round_to_grid, tiny_config, tiny_model
from optimum_sparsesched import SparseScheduleConfig
from optimum_sparsesched.formats.compact import REQUIRES_PLUGIN_KEY, encode_weight
from optimum_sparsesched.formats.metadata import weights_metadata

#: deep and narrow: the decoder's buffers (one weight of the largest module) are small beside the model
SHAPE = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=4)
MEASURE = r"""
import gc, json, re, sys, warnings
import torch, transformers, optimum_sparsesched

def kib(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

folder, mode = sys.argv[1], sys.argv[2]
config = transformers.AutoConfig.from_pretrained(folder)
del config.quantization_config
with torch.device("meta"):  # the architecture's modules imported, no weights
    transformers.AutoModelForCausalLM.from_config(config)
gc.collect()
base = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here
extra = {"quantization_config": optimum_sparsesched.SparseScheduleConfig(run_compressed=mode)} \
    if mode in ("compact", "sparse") else {}
with warnings.catch_warnings():
    warnings.filterwarnings("ignore")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **extra)
with torch.no_grad():
    model(torch.arange(32)[None])  # a prompt: decoded module by module
    model(torch.arange(1)[None])  # a decoding step: the sparse kernel with mode "sparse"
gc.collect()
print(json.dumps({"peak": kib("VmHWM") - base, "held": kib("VmRSS") - base}))
"""


def write_compact_checkpoint(folder, sparsity: float = 0.75, bits: int = 4, group_size: int = 128) -> int:
    """A compact checkpoint of a random Llama whose decoder Linears are rounded onto INT4 grids and pruned to
    ``sparsity`` at random (no calibration: the layout is what matters). Returns the decoder's float32 bytes."""
    model = tiny_model("llama", **SHAPE)
    cfg = SparseScheduleConfig(sparsity=sparsity, bits=bits, group_size=group_size, schedule="uniform")
    state = model.state_dict()
    dense = 0
    for name, module in model.named_modules():
        if ".layers." not in name or not isinstance(module, torch.nn.Linear):
            continue
        w, grid = round_to_grid(module.weight.detach().clone(), bits, group_size, sym=False)
        w[torch.rand(w.shape, generator=torch.Generator().manual_seed(len(state))) < sparsity] = 0
        del state[f"{name}.weight"]
        state[f"{name}.weight"] = torch.empty(0)
        encoded = encode_weight(w, grid, bits, group_size, sym=False)
        state.update({f"{name}.{suffix}": t for suffix, t in encoded.items()})
        cfg.results.layer_sparsities[name] = sparsity
        dense += w.numel() * 4
    state[REQUIRES_PLUGIN_KEY] = torch.empty(0, dtype=torch.uint8)
    state.pop("lm_head.weight", None)  # tied to the embeddings
    config = tiny_config("llama", **SHAPE)
    config.quantization_config = cfg.to_dict()
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt", **weights_metadata(cfg.export_spec(), cfg.results.layer_sparsities,
                                                                   cfg.options_dict())})
    return dense


def test_run_compressed_holds_less_than_the_decoded_model(tmp_path):
    dense_kib = write_compact_checkpoint(tmp_path) / 1024  # 78.6 MB of float32 decoder weights
    # glibc raises its mmap threshold after each large free, so freed temporaries can stay on the heap and in the
    # RSS of one run and not the other: a fixed threshold returns every large block when it is freed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    runs = {mode: subprocess.Popen([sys.executable, "-c", MEASURE, str(tmp_path), mode], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env)
            for mode in ("compact", "sparse", "decoded")}
    kib = {}
    for mode, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
        kib[mode] = json.loads(out.strip().splitlines()[-1])
    assert kib["decoded"]["held"] > 0.9 * dense_kib, kib  # the measure sees the decoded weights
    # compact: ~2.3 bits per weight (7% of the float32 bytes) and one decoded Linear at a time during the forward (4 MB
    # here, plus the decoder's index buffers); both processes pay the same loader and forward costs (about 20 MB).
    # Measured: held 31 MB compact, 99 MB decoded (peak 36 / 102 MB)
    for kept in ("compact", "sparse"):
        assert kib["decoded"]["held"] - kib[kept]["held"] > 0.6 * dense_kib, (kept, kib, dense_kib)
        assert kib["decoded"]["peak"] - kib[kept]["peak"] > 0.6 * dense_kib, (kept, kib, dense_kib)
