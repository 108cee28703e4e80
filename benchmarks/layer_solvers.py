#!/usr/bin/env python3
"""The layer solvers on real layers: the loss ``‖(W − Ŵ)X‖² = tr((W − Ŵ) H (W − Ŵ)ᵀ)`` that each solver reaches
on the same damped Hessian, and its time, relative to the SparseGPT scan.

The Hessians are those of the dense model's blocks (``--blocks``) on ``--num-samples`` × ``--seq-len``
calibration windows of wikitext2-valid (each block fed the dense outputs of the previous one, so the layers are
those a uniform run sees at its first block, and close to it further down).

    python benchmarks/layer_solvers.py MODEL_DIR [--blocks 0 10 20 29] [--settings 0.5 0.7 0.8 2:4 0.7+int4]
        [--num-samples 16 --seq-len 512] [--json benchmarks/results/layer_solvers.json]
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

SOLVERS = ("sparsegpt", "refit", "admm")


def setting_spec(setting: str):
    """``"0.7"``, ``"2:4"`` or ``"0.7+int4"`` → a PruneSpec (solver set later)."""
    from optimum_sparsesched.obs.spec import PruneSpec

    if ":" in setting:
        n, m = map(int, setting.split(":"))
        return PruneSpec(sparsity=n / m, nm=(n, m))
    sparsity, _, quant = setting.partition("+int")
    return PruneSpec(sparsity=float(sparsity), bits=int(quant) if quant else None, group_size=128)


def capture(model_path: str, blocks: list[int], num_samples: int, seq_len: int) -> dict[str, tuple]:
    """``{module name: (weight [rows, cols], H [cols, cols])}`` for the Linears of ``blocks`` (dense model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_sparsesched import SparseScheduleConfig
    from optimum_sparsesched.pipeline.blocks import capture_block_inputs
    from optimum_sparsesched.pipeline.calibration import calibration_windows
    from optimum_sparsesched.pipeline.hessians import collect_block_hessians
    from optimum_sparsesched.pipeline.plan import plan_compression, weight_matrix
    from optimum_sparsesched.pipeline.sources import BlockSource

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    config = SparseScheduleConfig(schedule="uniform", dataset=wikitext_calibration_text(), num_samples=num_samples,
                                  seq_len=seq_len)
    plan = plan_compression(model, config.plan_spec())
    inputs = capture_block_inputs(model, calibration_windows(config.dataset, tokenizer, num_samples, seq_len, 0),
                                  "cpu")
    source = BlockSource(plan, inputs)
    layers = {}
    for i in range(max(blocks) + 1):
        with source.visit(i, "cpu") as visit:
            if i in blocks:
                hessians = collect_block_hessians(visit, inputs.hidden)
                for name, module in visit.modules.items():
                    layers[name] = (weight_matrix(module).detach().clone(), hessians[name].H.clone())
            for j, hidden in enumerate(inputs.hidden):
                inputs.hidden[j] = visit.forward(hidden)
    return layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29])
    ap.add_argument("--settings", nargs="+", default=["0.5", "0.7", "0.8", "2:4", "0.7+int4"])
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import dataclasses

    from optimum_sparsesched.obs.prune import prune

    torch.set_grad_enabled(False)
    layers = capture(args.model, args.blocks, args.num_samples, args.seq_len)
    rows = []
    print("| setting | solver | layer loss vs SparseGPT (sum over layers) | layers improved | time vs SparseGPT |")
    print("|---|---|---|---|---|")
    for setting in args.settings:
        totals = {}
        for solver in SOLVERS:
            spec = dataclasses.replace(setting_spec(setting), solver=solver)
            loss = base = seconds = 0.0
            improved = 0
            for weight, hessian in layers.values():
                t0 = time.perf_counter()
                result = prune(weight, hessian, spec, kernel="torch")
                seconds += time.perf_counter() - t0
                loss += result.loss
                base += result.sparsegpt_loss if result.sparsegpt_loss is not None else result.loss
                improved += result.solver != "sparsegpt"
            totals[solver] = (loss, seconds, improved)
        ref_loss, ref_s, _ = totals["sparsegpt"]
        for solver, (loss, seconds, improved) in totals.items():
            row = {"setting": setting, "solver": solver, "loss": loss, "loss_ratio": loss / ref_loss,
                   "seconds": seconds, "time_ratio": seconds / ref_s, "improved": improved, "layers": len(layers)}
            rows.append(row)
            print(f"| {setting} | {solver} | {loss / ref_loss - 1:+.1%} | {improved}/{len(layers)} | "
                  f"{seconds / ref_s:.2f}× |", flush=True)
    if args.json:
        from common import write_result

        write_result(args.json, {"blocks": args.blocks, "num_samples": args.num_samples, "seq_len": args.seq_len,
                                 "rows": rows})


if __name__ == "__main__":
    main()
