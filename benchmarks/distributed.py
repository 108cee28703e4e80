#!/usr/bin/env python3
"""Wall time of compression with 1 and N processes (torchrun, gloo on CPU / NCCL on GPUs) and the communication
volume per block, on a model folder.

    python benchmarks/distributed.py MODEL_DIR --procs 1 2 [--num-samples 16 --seq-len 512 --schedule uniform]
        [--preset default] [--threads 1] [--out results.json]

Each process gets OMP_NUM_THREADS = cores / N, so the runs use the same cores (``--threads T``: T threads in every
process instead, the same intra-op summation order in every run). Every run's compressed weights are compared with
the first run's (``agreement``: the largest difference, the share of weights whose zero/non-zero state differs,
and whether they are equal bit for bit). The communication printed per block is an upper bound: Σ_modules cols² · 8
bytes of float64 Hessian sums (modules that read the same input share one, so the all-reduce sends fewer) plus the
compressed weights broadcast (Σ_modules rows · cols · 4 bytes, fp32 run).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def worker(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_sparsesched as osp
    from common import wikitext_calibration_text

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    cfg = osp.SparseScheduleConfig(sparsity=a.sparsity, schedule=a.schedule, dataset=wikitext_calibration_text(),
                                   num_samples=a.num_samples, seq_len=a.seq_len, preset=a.preset)
    t0 = time.perf_counter()
    osp.compress(model, cfg, tokenizer=tok)
    seconds = time.perf_counter() - t0
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        digest = float(sum(p.double().sum() for n, p in model.named_parameters() if "proj" in n))
        if a.save:
            torch.save({n: model.get_submodule(n).weight.detach() for n in cfg.results.layer_sparsities}, a.save)
        print("RESULT " + json.dumps({"seconds": seconds, "weights_sum": digest}), flush=True)


def agreement(reference: str, other: str) -> dict:
    """How far the compressed weights saved at ``other`` are from those at ``reference``."""
    import torch

    ref, got = torch.load(reference), torch.load(other)
    diff = max(float((got[n].float() - w.float()).abs().max()) for n, w in ref.items())
    flips = sum(int(((got[n] == 0) != (w == 0)).sum()) for n, w in ref.items())
    total = sum(w.numel() for w in ref.values())
    return {"max_abs_diff": diff, "mask_flips": flips, "mask_flip_share": flips / total,
            "bit_identical": all(torch.equal(got[n], w) for n, w in ref.items())}


def communication_per_block(model_path: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from optimum_sparsesched.pipeline.blocks import find_decoder_blocks
    from optimum_sparsesched.pipeline.plan import compressible_modules, weight_matrix

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    _, blocks = find_decoder_blocks(model)
    mats = [weight_matrix(m).shape for m in compressible_modules(blocks[0]).values()]
    hessian = sum(c * c * 8 for _, c in mats)  # float64 sums
    weights = sum(r * c * 4 for r, c in mats)  # fp32 run
    return {"hessian_bytes_per_block": hessian, "weight_bytes_per_block": weights, "blocks": len(blocks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--schedule", default="uniform")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads of every process [cores / N]")
    ap.add_argument("--out", default=None, help="also write the JSON there")
    ap.add_argument("--save", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker", action="store_true")
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    import tempfile

    cores = os.cpu_count() or 1
    rows = []
    scratch = tempfile.TemporaryDirectory(prefix="distributed-bench-")
    for n in a.procs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        threads = a.threads or max(1, cores // n)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        saved = os.path.join(scratch.name, f"weights-{n}.pt")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
               "127.0.0.1", "--master-port", str(port), __file__, a.model, "--worker", "--sparsity",
               str(a.sparsity), "--schedule", a.schedule, "--num-samples", str(a.num_samples), "--seq-len",
               str(a.seq_len), "--preset", a.preset, "--save", saved]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            sys.exit(out.stderr[-3000:])
        rows.append({"procs": n, "threads_per_proc": threads, **json.loads(line[0][7:])})
        rows[-1]["agreement_with_first_run"] = agreement(os.path.join(scratch.name, f"weights-{a.procs[0]}.pt"), saved)
        print(rows[-1], flush=True)
    comm = communication_per_block(a.model)
    result = {"rows": rows, **comm, "command": " ".join(["python", "benchmarks/distributed.py"] + sys.argv[1:])}
    print(json.dumps(result, indent=1))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
