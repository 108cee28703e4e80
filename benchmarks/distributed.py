#!/usr/bin/env python3
"""Wall time of compression with 1 and N processes (torchrun, gloo on CPU / NCCL on GPUs) and the communication
volume per block, on a model folder.

    python benchmarks/distributed.py MODEL_DIR --procs 1 2 [--num-samples 16 --seq-len 512 --schedule uniform]

Each process gets OMP_NUM_THREADS = cores / N, so the runs use the same cores. The communication printed per
block is an upper bound: Σ_modules cols² · 4 bytes of Hessians (modules that read the same input share one, so
the all-reduce sends fewer) plus the compressed weights broadcast (Σ_modules rows · cols · 4 bytes, fp32 run).
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
                                   num_samples=a.num_samples, seq_len=a.seq_len)
    t0 = time.perf_counter()
    osp.compress(model, cfg, tokenizer=tok)
    seconds = time.perf_counter() - t0
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        digest = float(sum(p.double().sum() for n, p in model.named_parameters() if "proj" in n))
        print("RESULT " + json.dumps({"seconds": seconds, "weights_sum": digest}), flush=True)


def communication_per_block(model_path: str) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from optimum_sparsesched.pipeline.blocks import find_decoder_blocks
    from optimum_sparsesched.pipeline.plan import compressible_modules, weight_matrix

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    _, blocks = find_decoder_blocks(model)
    mats = [weight_matrix(m).shape for m in compressible_modules(blocks[0]).values()]
    hessian = sum(c * c * 4 for _, c in mats)
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
    ap.add_argument("--worker", action="store_true")
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    cores = os.cpu_count() or 1
    rows = []
    for n in a.procs:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n)), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr",
               "127.0.0.1", "--master-port", str(port), __file__, a.model, "--worker", "--sparsity",
               str(a.sparsity), "--schedule", a.schedule, "--num-samples", str(a.num_samples), "--seq-len",
               str(a.seq_len)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode != 0 or not line:
            sys.exit(out.stderr[-3000:])
        rows.append({"procs": n, "threads_per_proc": max(1, cores // n), **json.loads(line[0][7:])})
        print(rows[-1], flush=True)
    comm = communication_per_block(a.model)
    print(json.dumps({"rows": rows, **comm, "command": " ".join(["python", "benchmarks/distributed.py"] + sys.argv[1:])},
                     indent=1))


if __name__ == "__main__":
    main()
