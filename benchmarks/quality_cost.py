#!/usr/bin/env python3
"""Where a preset's compression time goes, row by row against uniform SparseGPT in the same invocation: the rows of
``benchmarks/presets.py`` (same protocol: WikiText-2 test and Shakespeare, reduced-512 by default) with the CPU
seconds of the compression split into the stages of the block loop.

Stages (CPU seconds, ``time.process_time``; a stage called inside another is counted in the outermost one, so the
stages add up to the total): ``capture`` (block-0 inputs), ``measurement`` (the schedule's statistics and damage
probes), ``search`` (the allocation search), ``hessians`` (the block loop's Hessian forwards), ``scan`` (the
SparseGPT scan of the block loop, and with ``bits`` the GPTQ pass on a solver's support), ``solver`` (the refit /
ADMM candidates of the block loop), ``reconstruction`` (:func:`optimum_sparsesched.obs.reconstruct.reconstruct_block`),
``forwards`` (the block loop's other block forwards: the next block's inputs, the dense stream), ``rest`` (model
loading, calibration, inverses, checks: the total minus the stages). Inside ``solver`` (and wherever else they run)
``eigh``, ``admm`` (the support search) and ``refit`` are also clocked on their own (``inner``, not added).

A row is a name of ``presets.ROWS``, optionally with options on top: ``quality:reconstruct_epochs=1`` (values are
Python literals)::

    python benchmarks/quality_cost.py MODEL_DIR --target 0.7 --rows uniform-sparsegpt quality \\
        quality:reconstruct_epochs=1 [--pattern 2:4] [--bits 4 --group-size 128] [--out DIR]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import json
import logging
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_FILE, EVAL_TEXTS, wikitext_calibration_text, write_result  # noqa: E402
from presets import ROWS  # noqa: E402

STAGES = ("capture", "measurement", "search", "hessians", "scan", "solver", "reconstruction", "forwards")
INNER = ("eigh", "admm", "refit")


class StageClock:
    """CPU seconds per stage; the outermost timed call owns the time of the calls inside it. Inner clocks
    (:data:`INNER`) count every call, wherever it runs."""

    def __init__(self) -> None:
        self.seconds = {s: 0.0 for s in STAGES}
        self.inner = {s: 0.0 for s in INNER}
        self.active: str | None = None

    def wrap(self, stage: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if stage in self.inner:
                c0 = time.process_time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.inner[stage] += time.process_time() - c0
            if self.active is not None:
                return fn(*args, **kwargs)
            self.active, c0 = stage, time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.process_time() - c0
                self.active = None
        return timed

    @contextlib.contextmanager
    def installed(self):
        """Wrap the stage functions where the block loop and the layer solve look them up."""
        import optimum_sparsesched.obs.prune as prune_mod
        import optimum_sparsesched.sequential as seq
        from optimum_sparsesched.obs import admm
        from optimum_sparsesched.obs.inverse import InverseHessian
        from optimum_sparsesched.pipeline.sources import BlockVisit

        targets = [(seq, "capture_block_inputs", "capture"), (seq, "measure_layer_statistics", "measurement"),
                   (seq, "search_allocation", "search"), (seq, "collect_block_hessians", "hessians"),
                   (seq, "reconstruct_block", "reconstruction"), (BlockVisit, "forward", "forwards"),
                   (prune_mod, "scan_with_damping", "scan"), (admm, "candidate", "solver"),
                   (InverseHessian, "eigh", "eigh"), (admm, "admm_support", "admm"), (admm, "refit", "refit")]
        saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in targets]
        try:
            for owner, name, stage in targets:
                setattr(owner, name, self.wrap(stage, getattr(owner, name)))
            yield self
        finally:
            for owner, name, fn in saved:
                setattr(owner, name, fn)


def parse_row(spec: str) -> tuple[str, dict]:
    """``name[:key=value,...]`` -> (base row name, options on top)."""
    name, _, rest = spec.partition(":")
    if name not in ROWS:
        raise SystemExit(f"--rows: unknown row {name!r}; allowed: {', '.join(ROWS)}")
    extra = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        extra[key] = ast.literal_eval(value)
    return name, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--pattern", default=None)
    ap.add_argument("--bits", type=int, default=None)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--rows", nargs="+", default=["uniform-sparsegpt", "quality"])
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    specs = [parse_row(r) for r in args.rows]
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("optimum_sparsesched.sequential").setLevel(logging.INFO)  # per block: the reconstruction

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_sparsesched as osp

    torch.set_grad_enabled(False)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = {"wikitext2": EVAL_FILE, "shakespeare": [EVAL_TEXTS["shakespeare"].read_text(encoding="utf-8")]}
    out = Path(args.out or "benchmarks/results/quality-cost")
    rows = []
    for spec, (name, extra) in zip(args.rows, specs):
        given = dict(sparsity=args.target, pattern=args.pattern, bits=args.bits, group_size=args.group_size)
        options = dict(ROWS[name], **{k: v for k, v in given.items() if v is not None}, **extra)
        config = osp.SparseScheduleConfig(dataset=wikitext_calibration_text(), num_samples=args.num_samples,
                                          seq_len=args.seq_len, tokenizer=tokenizer, **options)
        with StageClock().installed() as clock:
            t0, c0 = time.perf_counter(), time.process_time()
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, quantization_config=config)
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        stages = dict(clock.seconds, rest=cpu_seconds - sum(clock.seconds.values()))
        ppl = {key: osp.perplexity(model, tokenizer, text, args.eval_seq_len, args.eval_windows)
               for key, text in texts.items()}
        results = model.config.quantization_config.results
        row = {"name": spec, "options": options, "ppl": ppl, "compress_s": seconds, "compress_cpu_s": cpu_seconds,
               "stages_cpu_s": stages, "inner_cpu_s": clock.inner, "resolved_range": results.resolved_range,
               "search": results.search, "threads": torch.get_num_threads()}
        write_result(out / (re.sub(r"[^A-Za-z0-9_.-]+", "+", spec.replace("=", "-")).strip("+") + ".json"), dict(row))
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("name", "ppl", "compress_cpu_s", "stages_cpu_s", "inner_cpu_s")}),
              flush=True)
        del model
    base = next((r for r in rows if r["name"] == "uniform-sparsegpt"), None)
    print("| row | WikiText-2 | Shakespeare | CPU s | × uniform (CPU) | " + " | ".join(STAGES) + " | rest |")
    print("|---" * (len(STAGES) + 6) + "|")
    for r in rows:
        ratio = f"{r['compress_cpu_s'] / base['compress_cpu_s']:.2f}" if base else "–"
        print(f"| {r['name']} | {r['ppl']['wikitext2']:.2f} | {r['ppl']['shakespeare']:.2f} | "
              f"{r['compress_cpu_s']:.0f} | {ratio} | " + " | ".join(f"{r['stages_cpu_s'][s]:.0f}" for s in STAGES)
              + f" | {r['stages_cpu_s']['rest']:.0f} |")


if __name__ == "__main__":
    main()
