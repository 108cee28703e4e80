#!/usr/bin/env python3
"""Every schedule at every target on one model: uniform, OWL, depth ramp, the paper's literal Hessian rule, and the
Hessian schedule (manual and auto range). Rows named hessian-context-* in benchmarks/results came from the retired
options error_metric="kl" and granularity="module" of 0.1.0. Writes one JSON per row to --out, a PNG of the per-layer sparsity of each
schedule per target, and prints a Markdown table for benchmarks/RESULTS.md.

    python benchmarks/schedules.py MODEL_DIR --targets 0.7 0.8 [--rows uniform owl ramp ...]
        [--num-samples 128 --seq-len 2048 --eval-seq-len 2048 --eval-windows N] [--out benchmarks/results/NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import compress_and_evaluate, wikitext_calibration_text  # noqa: E402


def row_specs(target: float) -> dict[str, dict]:
    manual = [round(max(0.0, target - 0.1), 4), round(min(0.99, target + 0.1), 4)]
    return {
        "uniform": dict(schedule="uniform"),
        "owl": dict(schedule="owl", owl_m=5.0, owl_lambda=0.08),
        "ramp": dict(schedule="ramp", sparsity_range=manual),
        "paper-literal": dict(schedule="hessian", error_metric="obs", sparsity_range=manual),
        "hessian-manual": dict(schedule="hessian", sparsity_range=manual),
        "hessian-auto": dict(schedule="hessian"),  # the default: error_metric="kl-alone", auto range
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["sparsity"] for r in rows})
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4), squeeze=False)
    for ax, target in zip(axes[0], targets):
        for r in (r for r in rows if r["sparsity"] == target):
            names = list(r["layer_sparsities"])
            ax.plot(range(len(names)), [r["layer_sparsities"][n] for n in names], lw=1,
                    label=f'{r["row"]} (ppl {r["ppl"]:.0f})')
        ax.set_title(f"target sparsity {target}")
        ax.set_xlabel("compressed module (depth order)")
        ax.set_ylabel("sparsity")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.8])
    ap.add_argument("--rows", nargs="+", default=None)
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--bits", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/schedules"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON rows in --out")
    a = ap.parse_args()
    if a.plot_only:
        rows = [json.loads(p.read_text()) for p in sorted(a.out.glob("*.json"))]
        rows = [r for r in rows if "layer_sparsities" in r and "row" in r]
        plot([r for r in rows if r["sparsity"] in a.targets], a.out / "layer_sparsity.png")
        return

    from transformers import AutoTokenizer

    import optimum_sparsesched as osp

    tok = AutoTokenizer.from_pretrained(a.model)
    calibration = wikitext_calibration_text()
    a.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "benchmarks/schedules.py"] + sys.argv[1:])
    rows = []
    for target in a.targets:
        specs = row_specs(target)
        for name in a.rows or list(specs):
            cfg = osp.SparseScheduleConfig(sparsity=target, dataset=calibration, tokenizer=tok, bits=a.bits,
                                           num_samples=a.num_samples, seq_len=a.seq_len, **specs[name])
            row = compress_and_evaluate(a.model, tok, cfg, eval_seq_len=a.eval_seq_len, eval_windows=a.eval_windows)
            row.update(row=name, sparsity=target, bits=a.bits, options=specs[name], command=command,
                       protocol=f"calib {a.num_samples}x{a.seq_len}, eval "
                                f"{a.eval_windows or 'all'}x{a.eval_seq_len}")
            rows.append(row)
            tag = f"{name}-{target}" + (f"-int{a.bits}" if a.bits else "")
            (a.out / f"{tag}.json").write_text(json.dumps(row, indent=1))
            rng = [round(x, 3) for x in row["resolved_range"]] if row["resolved_range"] else None
            print(f"{target:.2f} {name:22s} ppl {row['ppl']:9.2f}  range {rng}  "
                  f"{row['compress_s']:.0f}s  mean {row['achieved_sparsity']:.4f}", flush=True)
    plot(rows, a.out / "layer_sparsity.png")
    print("\n| target | schedule | ppl | range | compress s |\n|---|---|---|---|---|")
    for r in rows:
        rng = "[{:.3f}, {:.3f}]".format(*r["resolved_range"]) if r["resolved_range"] else "-"
        print(f"| {r['sparsity']} | {r['row']} | {r['ppl']:.2f} | {rng} | "
              f"{r['compress_s']:.0f} |")


if __name__ == "__main__":
    main()
