#!/usr/bin/env python3
"""Issue 4's speed target: whole compression of a model with the Triton column-block kernel against the torch
column loop (the reference SparseGPT path), same options, and the perplexity of both results (equal within 2%).

Needs CUDA and triton. Each row runs the torch loop once and the kernel twice (the first run includes Triton's
JIT compilation; the second, the time users see once the kernel cache is warm).

    python benchmarks/obs_speed.py MODEL_DIR [--rows 0.5 2:4 0.5+4] [--num-samples 128 --seq-len 2048]
        [--eval-windows N] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import CALIBRATION_FILE, EVAL_FILE, compress_and_evaluate, wikitext_calibration_text, write_result  # noqa: E402


def config_for(row: str, texts: list[str], num_samples: int, seq_len: int):
    from optimum_sparsesched import SparseScheduleConfig

    common = dict(dataset=texts, num_samples=num_samples, seq_len=seq_len, schedule="uniform")
    if ":" in row:
        n, m = map(int, row.split(":"))
        return SparseScheduleConfig(sparsity=n / m, pattern=row, **common)
    sparsity, _, bits = row.partition("+")
    return SparseScheduleConfig(sparsity=float(sparsity), bits=int(bits) if bits else None, **common)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--rows", nargs="+", default=["0.5", "2:4", "0.5+4"])
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("obs_speed.py measures the GPU kernel: it needs CUDA (and the triton package)")
    from transformers import AutoTokenizer

    from optimum_sparsesched.obs.prune import KERNEL_ENV

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = wikitext_calibration_text(CALIBRATION_FILE)
    rows = []
    for row in args.rows:
        result = {"row": row}
        for label, kernel in (("torch", "torch"), ("triton_cold", "triton"), ("triton", "triton")):
            os.environ[KERNEL_ENV] = kernel
            torch.cuda.reset_peak_memory_stats()
            got = compress_and_evaluate(args.model, tokenizer, config_for(row, texts, args.num_samples, args.seq_len),
                                        EVAL_FILE, 2048, args.eval_windows)
            result[label] = {"compress_s": got["compress_s"], "ppl": got["ppl"],
                             "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
            print(row, label, result[label], flush=True)
        result["speedup"] = result["torch"]["compress_s"] / result["triton"]["compress_s"]
        result["ppl_ratio"] = result["triton"]["ppl"] / result["torch"]["ppl"]
        rows.append(result)
        print(f"{row}: torch {result['torch']['compress_s']:.1f} s, triton {result['triton']['compress_s']:.1f} s "
              f"({result['speedup']:.1f}x), ppl {result['torch']['ppl']:.2f} vs {result['triton']['ppl']:.2f}")
    if args.json:
        write_result(args.json, {"rows": rows, "device": torch.cuda.get_device_name()})


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
