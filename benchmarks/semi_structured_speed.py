#!/usr/bin/env python3
"""Tokens/s of a dense model vs the same model with its 2:4 weights as semi-structured sparse tensors
(``optimum_sparsesched.to_semi_structured``), prefill and decode, at several batch sizes. Needs a CUDA GPU with
sparse tensor cores (compute capability 8.0+); exits with a clear message otherwise.

    python benchmarks/semi_structured_speed.py MODEL_DIR [--batch-sizes 1 8 32] [--prompt-len 512]
        [--new-tokens 128] [--dtype float16] [--out benchmarks/results/semi_structured_speed.json]

MODEL_DIR: a checkpoint compressed with ``pattern="2:4"`` (e.g. ``optimum-sparsesched compress MODEL OUT
--sparsity 0.5 --pattern 2:4``), or any dense model: its Linear layers are then pruned 2:4 by magnitude here, which
changes the quality but not the speed of the kernels (``--require-2-4`` refuses instead). The dense baseline is the
same weights as plain dense tensors. Prefill: one forward over ``batch × prompt_len`` random tokens (with cache);
decode: ``new_tokens`` single-token steps on that cache, greedy. Timings: CUDA events after warm-up runs,
median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402


def magnitude_2_4(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Zero the 2 smallest-magnitude weights of every 4 consecutive inputs of each row; returns modules pruned."""
    count = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and not name.endswith(skip) and m.weight.shape[1] % 4 == 0:
            w = m.weight.data.view(m.weight.shape[0], -1, 4)
            smallest = w.abs().topk(2, dim=-1, largest=False).indices
            w.scatter_(-1, smallest, 0)
            count += 1
    return count


@torch.no_grad()
def measure(model, batch: int, prompt_len: int, new_tokens: int, vocab: int, repeats: int) -> dict[str, float]:
    ids = torch.randint(0, vocab, (batch, prompt_len), device="cuda")

    def prefill():
        return model(input_ids=ids, use_cache=True)

    def timed(fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000

    def decode_from(out):
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

        def run():
            nonlocal past, token
            for _ in range(new_tokens):
                step = model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = step.past_key_values, step.logits[:, -1:].argmax(-1)
        return run

    prefill()  # warm-up (kernel selection, allocator)
    decode_from(prefill())()
    prefill_s = statistics.median(timed(prefill) for _ in range(repeats))
    decode_s = statistics.median(timed(decode_from(prefill())) for _ in range(repeats))
    return {"prefill_tokens_per_s": batch * prompt_len / prefill_s, "prefill_s": prefill_s,
            "decode_tokens_per_s": batch * new_tokens / decode_s, "decode_s": decode_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    ap.add_argument("--require-2-4", action="store_true", help="refuse a model whose weights are not 2:4 already")
    ap.add_argument("--out", default="benchmarks/results/semi_structured_speed.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("semi_structured_speed.py needs a CUDA GPU with sparse tensor cores (compute capability 8.0 "
                         "or newer): torch.sparse semi-structured tensors run on CUDA only, and this torch/machine "
                         f"has no CUDA device (torch {torch.__version__}). Nothing was measured.")

    from transformers import AutoModelForCausalLM

    import optimum_sparsesched as osp
    from optimum_sparsesched.formats.semi_structured import two_four_linears

    dtype = getattr(torch, a.dtype)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).cuda().eval()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    already = len(two_four_linears(model))
    if already < len(linears):
        if a.require_2_4:
            raise SystemExit(f"{a.model}: {already} of {len(linears)} Linear layers are 2:4; compress it with "
                             "pattern='2:4' first (or drop --require-2-4 to prune by magnitude for timing)")
        print(f"{already} of {len(linears)} Linear layers are 2:4; pruning the rest 2:4 by magnitude (speed only)")
        magnitude_2_4(model)
    vocab = model.config.get_text_config().vocab_size
    rows = []
    for variant in ("dense", "2:4"):
        if variant == "2:4":
            osp.to_semi_structured(model)
            print(f"converted {len(model.semi_structured_modules)} Linear layers to semi-structured sparse tensors")
        for batch in a.batch_sizes:
            row = {"variant": variant, "batch": batch,
                   **measure(model, batch, a.prompt_len, a.new_tokens, vocab, a.repeats)}
            rows.append(row)
            print(json.dumps(row))
            torch.cuda.empty_cache()
    write_result(a.out, {"rows": rows, "device": torch.cuda.get_device_name(), "dtype": a.dtype,
                         "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "torch": torch.__version__})


if __name__ == "__main__":
    main()
