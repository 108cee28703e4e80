#!/usr/bin/env python3
"""On-disk size of compressed checkpoints: compact (bitmask + values / packed INT4 codes), compressed-tensors and
dense, against the bf16 checkpoint of the same model; and a bit-exact reload check of each compact checkpoint.

The model is compressed in bfloat16 (the dtype checkpoints are published in). Sizes depend on the sparsity and
bits, not on which weights the schedule keeps, so a short calibration (``--num-samples 8 --seq-len 256``) is enough.

    python benchmarks/checkpoint_size.py MODEL_DIR [--rows 0.5 0.7 0.5+4 0.7+4] [--schedule uniform] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
from common import CALIBRATION_FILE, wikitext_calibration_text  # noqa: E402


def stored_bytes(folder: Path) -> dict[str, int]:
    """Bytes of every tensor in the folder's safetensors files, by name."""
    sizes = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                numel = 1
                for d in t.get_shape():
                    numel *= d
                sizes[key] = numel * {"BF16": 2, "F16": 2, "F32": 4, "U8": 1, "I8": 1, "I32": 4, "I64": 8}[t.get_dtype()]
    return sizes


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--rows", nargs="+", default=["0.5", "0.7", "0.5+4", "0.7+4"],
                    help="SPARSITY or SPARSITY+BITS")
    ap.add_argument("--schedule", default="uniform")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import optimum_sparsesched  # noqa: F401  (registers the quantizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_sparsesched import SparseScheduleConfig

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = wikitext_calibration_text(CALIBRATION_FILE)
    work = Path(tempfile.mkdtemp(prefix="ckpt-size-"))
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    base.save_pretrained(work / "bf16")
    bf16_sizes, bf16_total = stored_bytes(work / "bf16"), folder_bytes(work / "bf16")
    del base
    results = []
    for row in args.rows:
        sparsity, _, bits = row.partition("+")
        bits = int(bits) if bits else None
        formats = ["compact", "dense"] + (["compressed-tensors"] if bits else [])
        for fmt in formats:
            cfg = SparseScheduleConfig(sparsity=float(sparsity), bits=bits, group_size=args.group_size,
                                       sym=fmt == "compressed-tensors", schedule=args.schedule, dataset=texts,
                                       num_samples=args.num_samples, seq_len=args.seq_len, export_format=fmt)
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, quantization_config=cfg)
            out = work / f"{row}-{fmt}"
            model.save_pretrained(out)
            cfg = model.config.quantization_config  # the loaded model's copy holds the results
            modules = list(cfg.results.layer_sparsities)
            sizes = stored_bytes(out)
            decoder = sum(v for k, v in sizes.items() if k.rpartition(".")[0] in modules)
            decoder_bf16 = sum(bf16_sizes[f"{m}.weight"] for m in modules)
            entry = {"row": row, "format": fmt, "sparsity": float(sparsity), "bits": bits,
                     "group_size": args.group_size, "sym": cfg.sym, "decoder_bytes": decoder,
                     "decoder_bf16_bytes": decoder_bf16, "decoder_ratio": decoder / decoder_bf16,
                     "folder_bytes": folder_bytes(out), "bf16_folder_bytes": bf16_total,
                     "folder_ratio": folder_bytes(out) / bf16_total}
            if fmt == "compact":
                start = time.perf_counter()
                reloaded = AutoModelForCausalLM.from_pretrained(out)
                entry["reload_s"] = time.perf_counter() - start
                before, after = model.state_dict(), reloaded.state_dict()
                entry["bit_exact"] = all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k])
                                         for k in before)
                del reloaded
            results.append(entry)
            print(json.dumps(entry), flush=True)
            del model
    print(f"\n| row | format | decoder weights | vs bf16 | whole folder | vs bf16 folder | bit-exact reload |")
    print("|---|---|---|---|---|---|---|")
    for e in results:
        print(f"| {e['row']} | {e['format']} | {e['decoder_bytes'] / 2**20:.1f} MiB | {e['decoder_ratio']:.1%} | "
              f"{e['folder_bytes'] / 2**20:.1f} MiB | {e['folder_ratio']:.1%} | {e.get('bit_exact', '-')} |")
    print(f"bf16: decoder weights {results[0]['decoder_bf16_bytes'] / 2**20:.1f} MiB, folder "
          f"{bf16_total / 2**20:.1f} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
