#!/usr/bin/env python3
"""The source check on a real checkpoint: what it costs, and what it refuses.

    python benchmarks/source_check.py MODEL_DIR [--out benchmarks/results/source_check.json]

Cost (CPU seconds, user+sys of this process): the checks of the checkpoint's files (config.json, index,
safetensors headers), and :func:`optimum_sparsesched.pipeline.source_check.check_source` on the model in memory
(float32) and on the model as ``compress_checkpoint`` builds it (every block on "disk": each block tensor is read
from the shards for the finiteness check). Faults: three damaged copies of the checkpoint in a temporary folder (one
block tensor removed, one NaN in the last block's ``down_proj``, the weight file cut by 1 KiB), each given to
``compress_checkpoint``: the error it raises and the CPU time until the refusal.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(fn) -> tuple[dict, object]:
    c0, w0 = cpu(), time.perf_counter()
    value = fn()
    return {"cpu_s": round(cpu() - c0, 3), "wall_s": round(time.perf_counter() - w0, 3)}, value


def refusal(src: Path, out: Path) -> dict:
    import optimum_sparsesched as osp

    text = Path(osp.__file__).parent / "data" / "calibration.txt"  # never read: every refusal comes first
    cfg = osp.SparseScheduleConfig(sparsity=0.5, schedule="uniform", dataset=str(text), num_samples=1, seq_len=8)

    def run():
        try:
            osp.compress_checkpoint(src, out, cfg)
        except ValueError as exc:
            return str(exc)
        return None

    cost, message = timed(run)
    return {**cost, "error": message, "out_written": out.exists()}


def main() -> None:
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from common import write_result
    from optimum_sparsesched.pipeline.checkpoint_files import check_checkpoint_folder, read_config_file
    from optimum_sparsesched.pipeline.source_check import check_finite, check_source
    from optimum_sparsesched.streaming import streaming_device_map

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--out", default="benchmarks/results/source_check.json")
    a = ap.parse_args()
    src = Path(a.model)
    result: dict = {"model": src.name, "threads": torch.get_num_threads()}
    result["files"], _ = timed(lambda: (read_config_file(src), check_checkpoint_folder(src)))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    check_finite(model)  # first touch of the converted weights: not the check's cost
    result["in_memory_float32"], _ = timed(lambda: check_source(model))
    del model
    with tempfile.TemporaryDirectory() as scratch:
        streamed = AutoModelForCausalLM.from_pretrained(src, device_map=streaming_device_map(src),
                                                        offload_folder=scratch)
        result["streamed"], _ = timed(lambda: check_source(streamed))
        del streamed
    faults = {}
    with tempfile.TemporaryDirectory() as tmp:
        state = load_file(src / "model.safetensors")
        blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("model.layers.")})
        missing = f"model.layers.{blocks[len(blocks) // 2]}.mlp.up_proj.weight"
        poisoned = f"model.layers.{blocks[-1]}.mlp.down_proj.weight"
        for name in ("one block tensor missing", "NaN in the last block's down_proj", "weight file cut by 1 KiB"):
            copy = Path(tmp) / name.replace(" ", "-").replace("'", "")
            shutil.copytree(src, copy, ignore=shutil.ignore_patterns("model.safetensors"))
            damaged = {k: v for k, v in state.items() if k != missing or name != "one block tensor missing"}
            if name.startswith("NaN"):
                damaged[poisoned] = state[poisoned].clone()
                damaged[poisoned].view(-1)[7] = float("nan")
            if name.startswith("weight file cut"):
                (copy / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:-1024])
            else:
                save_file(damaged, str(copy / "model.safetensors"), metadata={"format": "pt"})
            faults[name] = refusal(copy, Path(tmp) / "out")
            print(name, faults[name], flush=True)
    result["faults"] = faults
    print(json.dumps(result, indent=1))
    write_result(a.out, result)


if __name__ == "__main__":
    main()
