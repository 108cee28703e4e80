#!/usr/bin/env python3
"""The ``hessian`` schedule's per-block damage estimates side by side: ``error_metric="kl-alone"`` (each block
pruned alone, its stream run to the logits: ``L²/2`` block forwards per probe window) against ``"fisher"`` (one
backward pass, ``O(L)``), with the CPU time of each measurement, their rank correlation over the blocks, and the
Fisher estimate measured with probe windows of every benchmark text (how much the damage profile over depth
depends on the text the probes are drawn from).

    OMP_NUM_THREADS=2 python benchmarks/schedule_damage.py MODEL_DIR [--sparsity 0.7] [--probe-samples 4]
        [--seq-len 512] [--no-kl] [--out benchmarks/results/schedule24/damage-MODEL.json]

Probe windows: the first ``probe_samples`` of the 16×``seq_len`` calibration windows (seed 0) of each text, the
windows a compression with that calibration text would probe. Per text, the allocation the ``hessian`` schedule
makes from each estimate is printed too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_TEXTS, load_eval_text, write_result  # noqa: E402


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--probe-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--texts", nargs="+", default=list(EVAL_TEXTS), choices=list(EVAL_TEXTS))
    ap.add_argument("--no-kl", action="store_true", help="skip the kl-alone measurement (the L² one)")
    ap.add_argument("--search-steps", type=int, default=0, help="on WikiText-2, also time the allocation search "
                    "(search_steps) from each estimate's schedule and record its KL before and after")
    ap.add_argument("--no-inverse-cache", action="store_true", help="the search recomputes a block's inverse "
                    "Hessians at every new level (its behaviour before issue 24), to time what the cache saves")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_sparsesched import SparseScheduleConfig
    from optimum_sparsesched.pipeline.blocks import capture_block_inputs
    from optimum_sparsesched.pipeline.calibration import calibration_windows
    from optimum_sparsesched.pipeline.plan import plan_compression
    from optimum_sparsesched.pipeline.residency import compute_device
    from optimum_sparsesched.schedule.allocate import allocate_sparsities
    from optimum_sparsesched.schedule.fisher import measure_fisher_statistics
    from optimum_sparsesched.schedule.search import search_allocation
    from optimum_sparsesched.schedule.statistics import measure_layer_statistics

    if a.no_inverse_cache:
        from optimum_sparsesched.schedule import search

        search.INVERSE_CACHE_BYTES = 0
    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    device = compute_device()
    rows = {}
    for text in a.texts:
        for metric in (["kl-alone"] if text == "wikitext2" and not a.no_kl else []) + ["fisher"]:
            cfg = SparseScheduleConfig(sparsity=a.sparsity, dataset=load_eval_text(text, calibration=True),
                                       num_samples=16, seq_len=a.seq_len, probe_samples=a.probe_samples,
                                       error_metric=metric, search_steps=a.search_steps if text == "wikitext2" else 0)
            plan, spec = plan_compression(model, cfg.plan_spec()), cfg.schedule_spec()
            windows = calibration_windows(cfg.dataset, tok, cfg.num_samples, cfg.seq_len, cfg.seed)
            probe = windows[: a.probe_samples]
            c0 = time.process_time()
            inputs = capture_block_inputs(model, probe, device)
            keep = spec.search_steps > 0
            measure = measure_fisher_statistics if spec.estimates_damage else measure_layer_statistics
            stats = measure(model, plan, inputs, probe, spec, device, keep_dense=keep)
            cpu = time.process_time() - c0
            allocation = allocate_sparsities(plan, spec, stats)
            per_block = [allocation.targets[next(iter(g))] for g in plan.modules if g]
            key = f"{text}/{metric}"
            rows[key] = {"damage": stats.block_damage, "cpu_s": cpu, "allocation": per_block,
                         "range": allocation.resolved_range}
            if keep:
                c0 = time.process_time()
                searched = search_allocation(model, plan, inputs, probe, stats, allocation, spec, device)
                rows[key]["search"] = dict(searched.search, cpu_s=time.process_time() - c0,
                                           allocation=[searched.targets[next(iter(g))] for g in plan.modules if g])
                print(f"  search: {rows[key]['search']}", flush=True)
            print(f"{key}: {cpu:.1f} CPU s, range {allocation.resolved_range}", flush=True)
            print("  damage " + " ".join(f"{d:.3g}" for d in stats.block_damage), flush=True)
            print("  alloc  " + " ".join(f"{s:.3f}" for s in per_block), flush=True)
    reference = rows.get("wikitext2/kl-alone") or rows["wikitext2/fisher"]
    correlations = {key: spearman(reference["damage"], r["damage"]) for key, r in rows.items()}
    for key, rho in correlations.items():
        print(f"spearman(damage of {key}, {'wikitext2/kl-alone' if 'wikitext2/kl-alone' in rows else 'wikitext2/fisher'}) = {rho:.3f}")
    name = Path(a.model.rstrip("/")).name
    write_result(a.out or f"benchmarks/results/schedule24/damage-{name}.json",
                 {"rows": rows, "spearman_vs_reference": correlations, "sparsity": a.sparsity,
                  "probe_samples": a.probe_samples, "seq_len": a.seq_len, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
