#!/usr/bin/env python3
"""Extra wall time of the Hessian schedule over uniform SparseGPT: times the schedule's measurement pass alone
(capture of the probe windows + dense pass with OBS curves + end-to-end damage, measured by streams or estimated
from one backward pass) at a given protocol, to be set against the uniform compression time of the same protocol
(benchmarks/wikitext2_ppl.py, compress_s).

    python benchmarks/schedule_cost.py MODEL_DIR --seq-len 2048 --probe-samples 4 [--error-metric fisher|kl-alone|obs]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import wikitext_calibration_text  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--probe-samples", type=int, default=4)
    ap.add_argument("--error-metric", default="fisher", choices=["fisher", "kl-alone", "obs"])
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_sparsesched import SparseScheduleConfig
    from optimum_sparsesched.pipeline.blocks import capture_block_inputs
    from optimum_sparsesched.pipeline.calibration import calibration_windows
    from optimum_sparsesched.pipeline.plan import plan_compression
    from optimum_sparsesched.pipeline.residency import compute_device
    from optimum_sparsesched.schedule.allocate import allocate_sparsities
    from optimum_sparsesched.schedule.fisher import measure_fisher_statistics
    from optimum_sparsesched.schedule.statistics import measure_layer_statistics

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    cfg = SparseScheduleConfig(sparsity=a.sparsity, dataset=wikitext_calibration_text(), num_samples=a.probe_samples,
                               seq_len=a.seq_len, probe_samples=a.probe_samples, error_metric=a.error_metric)
    device = compute_device()
    plan = plan_compression(model, cfg.plan_spec())
    windows = calibration_windows(cfg.dataset, tok, cfg.num_samples, cfg.seq_len, cfg.seed)
    t0 = time.perf_counter()
    inputs = capture_block_inputs(model, windows, device)
    measure = measure_fisher_statistics if cfg.schedule_spec().estimates_damage else measure_layer_statistics
    stats = measure(model, plan, inputs, windows, cfg.schedule_spec(), device)
    allocate_sparsities(plan, cfg.schedule_spec(), stats)
    seconds = time.perf_counter() - t0
    print(json.dumps({"schedule_measurement_s": seconds, "probe_samples": a.probe_samples, "seq_len": a.seq_len,
                      "device": str(device), "threads": torch.get_num_threads(),
                      "command": " ".join(["python", "benchmarks/schedule_cost.py"] + sys.argv[1:])}, indent=1))


if __name__ == "__main__":
    main()
