#!/usr/bin/env python3
"""How compression time and peak memory grow with model size: synthetic Llama models (random weights) of growing
width (fixed depth) and growing depth (fixed width), each compressed with uniform 0.5 SparseGPT, one fresh process
per model so the peak memory is that model's own. Fits ``log(time) = a + k·log(params)`` for each series and prints
the exponents ``k``.

    OMP_NUM_THREADS=1 python benchmarks/cost_growth.py [--widths 256 384 512 768 1024 1536] [--depth 4]
        [--depths 2 4 8 16 32] [--width 512] [--num-samples 8 --seq-len 256] [--out benchmarks/results/cost_growth.json]
        [--schedule hessian --error-metric fisher --series depth]

With ``--schedule hessian`` each row also records the CPU seconds of the schedule's measurement alone
(``schedule_cpu_s``: ``sequential.measure_schedule``, timed inside the process, 0.7 target) and its growth
exponent is fitted too: linear in depth means ``k ≈ 1`` on the depth series.

Calibration: the package's calibration text through a byte-level tokenizer (one token per UTF-8 byte; the models'
vocabulary is 512), ``num_samples`` windows of ``seq_len``. Model: hidden ``h``, MLP ``3h``, ``h/64`` heads
(``gcd(heads, 4)`` KV heads), fp32. Memory: on CPU the process's peak resident set (``ru_maxrss``) during
``compress`` minus its resident set just before (the model itself is not counted), next to the estimate of
:mod:`optimum_sparsesched.residency` (working set + activations, all on the host when the device is the CPU); on
CUDA ``torch.cuda.max_memory_allocated`` during ``compress``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_result  # noqa: E402

VOCAB = 512
DATA = Path(__file__).resolve().parents[1] / "optimum_sparsesched" / "data" / "calibration.txt"


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0..255): enough for calibration windows of a random model."""

    name_or_path = "bytes"

    def __call__(self, text: str, return_tensors: str = "pt", add_special_tokens: bool = False):
        ids = torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)
        return type("Encoding", (), {"input_ids": ids})()


def llama_config(hidden: int, layers: int):
    from transformers import LlamaConfig

    heads = max(1, hidden // 64)
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=math.gcd(heads, 4), max_position_embeddings=4096,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(hidden: int, layers: int, num_samples: int, seq_len: int, schedule: str = "uniform",
        error_metric: str = "fisher") -> dict:
    """Build and compress one model in this process; returns its row."""
    from transformers import LlamaForCausalLM

    import optimum_sparsesched as osp
    from optimum_sparsesched.pipeline.plan import plan_compression
    from optimum_sparsesched.pipeline.residency import compute_device, estimate_working_set

    import datasets  # noqa: F401  (imported by the calibration step; loaded now so its memory is not counted)

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(hidden, layers)).eval()
    cfg = osp.SparseScheduleConfig(sparsity=0.5 if schedule == "uniform" else 0.7, schedule=schedule,
                                   dataset=[DATA.read_text(encoding="utf-8")], num_samples=num_samples,
                                   seq_len=seq_len, error_metric=error_metric)
    from optimum_sparsesched import sequential

    measured = {"cpu_s": 0.0}
    measure_schedule = sequential.measure_schedule

    def timed(*args, **kwargs):
        c0 = time.process_time()
        try:
            return measure_schedule(*args, **kwargs)
        finally:
            measured["cpu_s"] += time.process_time() - c0

    sequential.measure_schedule = timed
    plan = plan_compression(model, cfg.plan_spec())
    working = estimate_working_set(model, plan.blocks, plan.modules, cfg.residency_spec()).total
    window_bytes = seq_len * hidden * 4
    device = compute_device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before, peak_before = current_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    osp.compress(model, cfg, tokenizer=ByteTokenizer())
    seconds = time.perf_counter() - t0
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"hidden": hidden, "layers": layers, "params": sum(p.numel() for p in model.parameters()),
           "compressed_params": sum(plan.sizes.values()), "seconds": seconds, "device": str(device),
           "threads": torch.get_num_threads(), "estimated_working_set": working,
           "estimated_activations": window_bytes * (num_samples + 1),
           "host_peak_delta": max(peak_after, peak_before) - rss_before, "schedule": schedule,
           "error_metric": error_metric, "schedule_cpu_s": measured["cpu_s"]}
    if device.type == "cuda":
        row["device_peak"] = torch.cuda.max_memory_allocated()
    return row


def fit_exponent(rows: list[dict], key: str = "seconds") -> tuple[float, float]:
    """Least squares ``log(rows[key]) = a + k·log(params)`` -> ``(k, a)``."""
    xs = [math.log(r["params"]) for r in rows]
    ys = [math.log(r[key]) for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return k, my - k * mx


def run_series(name: str, shapes: list[tuple[int, int]], a: argparse.Namespace) -> list[dict]:
    rows = []
    for hidden, layers in shapes:
        out = subprocess.run([sys.executable, __file__, "--one", str(hidden), str(layers),
                              "--num-samples", str(a.num_samples), "--seq-len", str(a.seq_len),
                              "--schedule", a.schedule, "--error-metric", a.error_metric],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            raise SystemExit(f"{name} h={hidden} L={layers} failed:\n{out.stderr[-3000:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["series"] = name
        rows.append(row)
        mib = 2**20
        print(f"{name:5s} h={hidden:5d} L={layers:3d} params={row['params'] / 1e6:8.2f}M "
              f"time={row['seconds']:8.2f}s host_peak_delta={row['host_peak_delta'] / mib:8.1f}MiB "
              f"estimate={(row['estimated_working_set'] + row['estimated_activations']) / mib:8.1f}MiB "
              f"schedule_cpu={row['schedule_cpu_s']:.2f}s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 384, 512, 768, 1024, 1536])
    ap.add_argument("--depth", type=int, default=4, help="blocks of the width series")
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    ap.add_argument("--width", type=int, default=512, help="hidden size of the depth series")
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/results/cost_growth.json")
    ap.add_argument("--schedule", default="uniform", choices=["uniform", "hessian"])
    ap.add_argument("--error-metric", default="fisher", choices=["fisher", "kl-alone"])
    ap.add_argument("--series", nargs="+", default=["width", "depth"], choices=["width", "depth"])
    ap.add_argument("--one", type=int, nargs=2, metavar=("HIDDEN", "LAYERS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], a.num_samples, a.seq_len, a.schedule, a.error_metric)))
        return
    shapes = {"width": [(h, a.depth) for h in a.widths], "depth": [(a.width, L) for L in a.depths]}
    runs = {name: run_series(name, shapes[name], a) for name in a.series}
    fits = {}
    for name, rows in runs.items():
        k, intercept = fit_exponent(rows)
        fits[name] = {"k": k, "a": intercept}
        print(f"{name} growth: log(time) = {intercept:.2f} + {k:.3f}·log(params)")
        if a.schedule != "uniform":
            k, intercept = fit_exponent(rows, "schedule_cpu_s")
            fits[name + "-schedule"] = {"k": k, "a": intercept}
            print(f"{name} growth of the schedule measurement: log(CPU s) = {intercept:.2f} + {k:.3f}·log(params)")
    write_result(a.out, {"rows": [r for rows in runs.values() for r in rows], "fits": fits,
                         "num_samples": a.num_samples, "seq_len": a.seq_len, "schedule": a.schedule,
                         "error_metric": a.error_metric, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")})


if __name__ == "__main__":
    main()
