#!/usr/bin/env python3
"""Presets and layer solvers against uniform SparseGPT, on WikiText-2 test (the calibration's domain) and on
held-out texts never used for calibration or to choose a default (``benchmarks/common.py``: Shakespeare, a novel, a
technical manual, Python source; ``--texts`` picks some).

Each row compresses the model on load (fp32, calibration = random windows of wikitext2-valid), times it, then
measures perplexity on the first ``--eval-windows`` windows of every text. One JSON per row goes to --out; a
Markdown table (with the wall and CPU time as ratios to the ``uniform-sparsegpt`` row of the same run) is printed.
The CPU time (``time.process_time``, all threads) is the steadier figure when other work shares the cores.

    python benchmarks/presets.py MODEL_DIR --target 0.7 [--pattern 2:4] [--bits 4 --group-size 128]
        [--rows uniform-sparsegpt hessian-sparsegpt default quality ...]
        [--num-samples 16 --seq-len 512 --eval-seq-len 512 --eval-windows 16] [--out benchmarks/results/presets-0.7]
        [--texts wikitext2 shakespeare novel manual code] [--set OPTION=JSON ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_TEXTS, load_eval_text, wikitext_calibration_text, write_result  # noqa: E402

#: row name -> options on top of the target; "preset" rows use the preset's solver and search
ROWS = {
    "uniform-sparsegpt": dict(schedule="uniform", preset="sparsegpt"),
    "uniform-refit": dict(schedule="uniform", solver="refit"),
    "uniform-admm": dict(schedule="uniform", solver="admm"),
    "hessian-sparsegpt": dict(schedule="hessian", preset="sparsegpt"),
    "default": dict(preset="default"),
    "hessian-admm": dict(schedule="hessian", solver="admm", search_steps=0),
    "quality": dict(preset="quality"),
    # block reconstruction: the kept weights of every block fitted to the dense block's outputs (3 epochs)
    "uniform-sparsegpt-rec": dict(schedule="uniform", preset="sparsegpt", reconstruct_epochs=3),
    "uniform-refit-rec": dict(schedule="uniform", solver="refit", reconstruct_epochs=3),
    "uniform-admm-rec": dict(schedule="uniform", solver="admm", reconstruct_epochs=3),
    "default-rec": dict(preset="default", reconstruct_epochs=3),
    "quality-rec": dict(preset="quality", reconstruct_epochs=3),
    # issue 24: the schedule's damage estimate
    "default-klalone": dict(preset="default", error_metric="kl-alone"),
    "quality-klalone": dict(preset="quality", error_metric="kl-alone"),
    "ramp-refit": dict(schedule="ramp", solver="refit"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--pattern", default=None, help="N:M pattern (then every row is uniform in that pattern)")
    ap.add_argument("--bits", type=int, default=None)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--rows", nargs="+", default=["uniform-sparsegpt", "hessian-sparsegpt", "default", "quality"],
                    choices=list(ROWS))
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--reconstruct-lr", type=float, default=None, help="override of the rows' reconstruct_lr")
    ap.add_argument("--texts", nargs="+", default=list(EVAL_TEXTS), choices=list(EVAL_TEXTS))
    ap.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE",
                    help="extra config options for every row but uniform-sparsegpt (JSON values), "
                         "e.g. sparsity_range=[0.6,0.8]")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_sparsesched as osp

    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = {key: load_eval_text(key) for key in args.texts}
    extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    out = Path(args.out or f"benchmarks/results/presets-{args.pattern or args.target}{'-int' + str(args.bits) if args.bits else ''}")
    rows = []
    for name in args.rows:
        given = dict(sparsity=args.target, pattern=args.pattern, bits=args.bits, group_size=args.group_size,
                     reconstruct_lr=args.reconstruct_lr if ROWS[name].get("reconstruct_epochs") else None)
        options = dict(ROWS[name], **{k: v for k, v in given.items() if v is not None},
                       **(extra if name != "uniform-sparsegpt" else {}))
        config = osp.SparseScheduleConfig(dataset=wikitext_calibration_text(), num_samples=args.num_samples,
                                          seq_len=args.seq_len, tokenizer=tokenizer, **options)
        t0, c0 = time.perf_counter(), time.process_time()
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, quantization_config=config)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        ppl = {key: osp.perplexity(model, tokenizer, text, args.eval_seq_len, args.eval_windows)
               for key, text in texts.items()}
        results = model.config.quantization_config.results
        blocks = list(dict.fromkeys(n.rsplit(".", 2)[0] for n in results.layer_sparsities))
        row = {"name": name, "options": options, "ppl": ppl, "compress_s": seconds, "compress_cpu_s": cpu_seconds,
               "resolved_range": results.resolved_range, "search": results.search,
               "block_sparsities": [next(v for n, v in results.layer_sparsities.items() if n.startswith(b + "."))
                                    for b in blocks], "threads": torch.get_num_threads()}
        write_result(out / f"{name}.json", dict(row))
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("name", "ppl", "compress_s")}), flush=True)
        del model
    base = next((r for r in rows if r["name"] == "uniform-sparsegpt"), None)
    print("| row | " + " | ".join(args.texts) + " | compress s (CPU s) | × uniform SparseGPT (CPU) |")
    print("|---|" + "---|" * len(args.texts) + "---|---|")
    for r in rows:
        ratio = (f"{r['compress_s'] / base['compress_s']:.2f} ({r['compress_cpu_s'] / base['compress_cpu_s']:.2f})"
                 if base else "–")
        cells = " | ".join(f"{r['ppl'][t]:.2f}" + (f" ({r['ppl'][t] / base['ppl'][t]:.2f}×)" if base else "")
                           for t in args.texts)
        print(f"| {r['name']} | {cells} | {r['compress_s']:.0f} ({r['compress_cpu_s']:.0f}) | {ratio} |")


if __name__ == "__main__":
    main()
