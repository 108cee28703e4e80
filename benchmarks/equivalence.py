"""Compress a model with a fixed set of configurations and save each result, or compare two such runs tensor by
tensor: the check that a refactoring (or another entry point) gives bit-identical checkpoints.

    python benchmarks/equivalence.py run MODEL_DIR OUT_A          # before the change
    python benchmarks/equivalence.py run MODEL_DIR OUT_B          # after it
    python benchmarks/equivalence.py compare OUT_A OUT_B          # exit 0 iff every saved tensor is identical
    python benchmarks/equivalence.py run MODEL_DIR OUT_S --mode stream   # through compress_checkpoint
    python benchmarks/equivalence.py run MODEL_DIR OUT_O --mode offload  # blocks offloaded to disk by accelerate

The configurations cover the default preset on the Hessian schedule (unstructured), the quality preset with joint
INT4 (ADMM, allocation search, block reconstruction), OWL, N:M with joint INT4 and a symmetric INT8 per-channel
grid, on a short calibration (8 windows of 256 tokens of the shipped text) so a run takes a few minutes on a CPU.
Three entry points (``--mode``): ``memory`` (``from_pretrained(..., quantization_config=cfg).save_pretrained``),
``offload`` (the same with every decoder block on ``"disk"`` through a ``device_map``) and ``stream``
(``compress_checkpoint``, one block in memory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

CONFIGS = {
    "hessian-0.7": dict(sparsity=0.7),
    "quality-0.7-int4": dict(sparsity=0.7, preset="quality", bits=4, group_size=128),
    "owl-0.6": dict(sparsity=0.6, schedule="owl"),
    "2of4-int4": dict(sparsity=0.5, pattern="2:4", bits=4, group_size=128),
    "uniform-0.5-int8-sym": dict(sparsity=0.5, schedule="uniform", bits=8, group_size=-1, sym=True),
}


def offload_device_map(model_dir: str) -> dict[str, str]:
    """Every decoder block on ``"disk"``, the rest on ``"cpu"``."""
    from optimum_sparsesched.streaming import streaming_device_map

    return streaming_device_map(Path(model_dir))


def run(model_dir: str, out: Path, names: list[str], mode: str = "memory") -> None:
    """Compress with each configuration and save, through the entry point ``mode`` (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_sparsesched as osp

    calibration = Path(osp.__file__).parent / "data" / "calibration.txt"
    tok = AutoTokenizer.from_pretrained(model_dir)
    for name in names:
        cfg = osp.SparseScheduleConfig(dataset=str(calibration), num_samples=8, seq_len=256, probe_samples=2,
                                       **CONFIGS[name])
        if mode == "stream":
            osp.compress_checkpoint(model_dir, out / name, cfg, tokenizer=tok, dtype=torch.float32)
        else:
            placement = {} if mode == "memory" else dict(device_map=offload_device_map(model_dir),
                                                         offload_folder=str(out / f"{name}-offload"))
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=cfg,
                                                         **placement)
            model.save_pretrained(out / name)
            tok.save_pretrained(out / name)
        print(f"saved {out / name}", flush=True)


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def compare(a: Path, b: Path) -> int:
    bad = 0
    for folder in sorted(p for p in a.iterdir() if p.is_dir() and not p.name.endswith("-offload")):
        ta, tb = load_tensors(folder), load_tensors(b / folder.name)
        if set(ta) != set(tb):
            print(f"{folder.name}: tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}")
            bad += 1
            continue
        diff = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
        qa = json.loads((folder / "config.json").read_text())["quantization_config"]
        qb = json.loads((b / folder.name / "config.json").read_text())["quantization_config"]
        sa = qa.get("layer_sparsities") or qa.get("results", {}).get("layer_sparsities")
        sb = qb.get("layer_sparsities") or qb.get("results", {}).get("layer_sparsities")
        print(f"{folder.name}: {len(ta)} tensors, {len(diff)} differ; layer_sparsities equal: {sa == sb}")
        bad += bool(diff) + (sa != sb)
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("model_dir")
    r.add_argument("out", type=Path)
    r.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    r.add_argument("--mode", default="memory", choices=["memory", "offload", "stream"],
                   help="entry point: in memory, blocks offloaded to disk, or compress_checkpoint")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    a = ap.parse_args()
    if a.cmd == "run":
        run(a.model_dir, a.out, a.configs, a.mode)
        return 0
    return compare(a.a, a.b)


if __name__ == "__main__":
    sys.exit(main())
