#!/usr/bin/env python3
"""Where one compression's time goes: cProfile of ``from_pretrained(MODEL, quantization_config=...)`` on the
reduced-512 protocol (16×512 calibration windows of WikiText-2 validation), printing the wall and CPU seconds and
the functions by cumulative time.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python benchmarks/profile_compress.py MODEL_DIR --preset default
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python benchmarks/profile_compress.py MODEL_DIR --preset sparsegpt --schedule uniform

The profiler adds its own overhead (about 10% here): compare rows of the same script, not with the presets' times.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import wikitext_calibration_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--schedule", default=None)
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--top", type=int, default=45, help="functions printed")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_sparsesched as osp

    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    options = {"schedule": args.schedule} if args.schedule else {}
    config = osp.SparseScheduleConfig(dataset=wikitext_calibration_text(), num_samples=args.num_samples,
                                      seq_len=args.seq_len, tokenizer=tokenizer, sparsity=args.sparsity,
                                      preset=args.preset, **options)
    profile = cProfile.Profile()
    cpu, wall = time.process_time(), time.perf_counter()
    profile.enable()
    AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, quantization_config=config)
    profile.disable()
    print(f"wall {time.perf_counter() - wall:.1f} s, CPU {time.process_time() - cpu:.1f} s")
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
