#!/usr/bin/env python3
"""Cost of the resume checks: the SHA-256 of each block's weights (taken as the block is visited, before it is
compressed) and of each saved block file, set against the block's compression time (Hessians + OBS solves), in one
run with ``checkpoint_dir`` (uniform schedule, the block loop of ``compress``).

    python benchmarks/resume_digest.py MODEL_DIR --sparsity 0.5 --num-samples 16 --seq-len 512 [--calibration FILE]
        [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import CALIBRATION_FILE, wikitext_calibration_text, write_result  # noqa: E402


def timed(record: list[float], fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        record.append(time.perf_counter() - t0)
        return out
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--calibration", default=str(CALIBRATION_FILE), help="wikitext2-valid.tokens")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_sparsesched.pipeline.checkpoint as checkpoint
    import optimum_sparsesched.pipeline.resume as resume
    import optimum_sparsesched.sequential as sequential
    from optimum_sparsesched import SparseScheduleConfig, compress

    digest_s: list[float] = []
    hessian_s: list[float] = []
    solve_s: list[float] = []
    file_sha_s: list[float] = []
    resume.block_digest = timed(digest_s, resume.block_digest)
    sequential.collect_block_hessians = timed(hessian_s, sequential.collect_block_hessians)
    sequential.solve_block = timed(solve_s, sequential.solve_block)
    checkpoint.file_sha256 = timed(file_sha_s, checkpoint.file_sha256)

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype))
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    with tempfile.TemporaryDirectory() as ckpt:
        cfg = SparseScheduleConfig(sparsity=a.sparsity, schedule="uniform", dataset=wikitext_calibration_text(Path(a.calibration)),
                                   num_samples=a.num_samples, seq_len=a.seq_len, checkpoint_dir=ckpt)
        t0 = time.perf_counter()
        compress(model, cfg, tokenizer=tok)
        total = time.perf_counter() - t0
    compression = [h + s for h, s in zip(hessian_s, solve_s)]
    result = {
        "blocks": len(compression), "dtype": a.dtype, "block_MB": block_bytes / 1e6,
        "digest_ms_per_block": 1e3 * statistics.mean(digest_s),
        "file_sha256_ms_per_block": 1e3 * statistics.mean(file_sha_s),
        "compression_s_per_block": statistics.mean(compression),
        "digest_share_of_compression": sum(digest_s) / sum(compression),
        "checks_share_of_compression": (sum(digest_s) + sum(file_sha_s)) / sum(compression),
        "digest_GB_per_s": block_bytes * len(digest_s) / sum(digest_s) / 1e9,
        "run_s": total, "threads": torch.get_num_threads(),
        "protocol": f"uniform {a.sparsity}, {a.num_samples}x{a.seq_len} calibration windows",
    }
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    if a.out:
        write_result(a.out, result)


if __name__ == "__main__":
    main()
