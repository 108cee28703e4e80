#!/usr/bin/env python3
"""Compress a model folder through `from_pretrained(..., quantization_config=SparseScheduleConfig(...))` and report
WikiText-2 perplexity with the protocol of shared/GPU.md (see common.py): fp32, `--num-samples` x `--seq-len`
calibration windows of wikitext2-valid, consecutive 2048-token windows of wikitext2-test (`--eval-windows` caps
their number for reduced CPU runs).

    python benchmarks/wikitext2_ppl.py MODEL_DIR --sparsity 0.5 [--schedule uniform] [--pattern 2:4] [--bits 4]
        [--dense] [--num-samples 128 --seq-len 2048 --eval-windows N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import CALIBRATION_FILE, EVAL_FILE, compress_and_evaluate, wikitext_calibration_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--schedule", default="uniform")
    ap.add_argument("--pattern", default=None)
    ap.add_argument("--bits", type=int, default=None)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--calib-file", type=Path, default=CALIBRATION_FILE)
    ap.add_argument("--eval-file", type=Path, default=EVAL_FILE)
    ap.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--extra", default="{}", help="JSON dict of further SparseScheduleConfig options")
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_sparsesched as osp

    tok = AutoTokenizer.from_pretrained(a.model)
    row = {"model": a.model, "num_samples": a.num_samples, "seq_len": a.seq_len, "eval_windows": a.eval_windows}
    if a.dense:
        dense = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        if torch.cuda.is_available():
            dense.cuda()
        row["dense_ppl"] = osp.perplexity(dense, tok, a.eval_file, a.eval_seq_len, a.eval_windows)
        print(f"dense ppl {row['dense_ppl']:.3f}", flush=True)
        del dense
    cfg = osp.SparseScheduleConfig(
        sparsity=a.sparsity, schedule=a.schedule, pattern=a.pattern, bits=a.bits, group_size=a.group_size,
        sym=a.sym, dataset=wikitext_calibration_text(a.calib_file), tokenizer=tok, num_samples=a.num_samples,
        seq_len=a.seq_len, **json.loads(a.extra))
    row.update(compress_and_evaluate(a.model, tok, cfg, a.eval_file, a.eval_seq_len, a.eval_windows))
    row.pop("layer_sparsities")
    row.update(sparsity=a.sparsity, schedule=a.schedule, pattern=a.pattern, bits=a.bits,
               group_size=a.group_size if a.bits else None,
               command=" ".join(["python", "benchmarks/" + os.path.basename(sys.argv[0])] + sys.argv[1:]))
    print(json.dumps(row, indent=1), flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
