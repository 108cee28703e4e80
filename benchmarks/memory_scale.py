"""Peak host memory against checkpoint size: compressing checkpoints larger than the memory it uses.

Synthetic Llama checkpoints with random bf16 weights (fixed width, growing depth: about 0.5, 1, 2 and 4 GB) are
written to disk, then each is compressed in a fresh process through both entry points:

- ``offload``: ``from_pretrained(path, quantization_config=cfg, device_map={blocks: "disk", rest: "cpu"},
  offload_folder=...)``, then ``save_pretrained(out)`` (written block by block);
- ``stream``: ``optimum_sparsesched.compress_checkpoint(path, out, cfg)``;

with the ``uniform`` and the ``hessian`` schedule. The child samples its resident memory (``VmRSS``, split into
anonymous and file-backed pages, from ``/proc/self/status``) every 20 ms in a thread, reads ``ru_maxrss`` at the end,
and reports the wall time and the block loads the run needed (from the block loop's log line). The peak is the
kernel's ``VmHWM`` (the process's own peak since it started); ``ru_maxrss`` is reported too, but on Linux it
also counts the parent's resident set at the fork, so the driver keeps itself small (checkpoints are written by a
child as well).

    python benchmarks/memory_scale.py --out benchmarks/results/memory_scale.json
    python benchmarks/memory_scale.py --sizes 0.5 4 --entries stream --schedules uniform    # a subset

Targets (issue 13): peak memory flat in depth (within 10% from the smallest to the largest checkpoint) and the
~4 GB checkpoint compressed with a peak RSS ≤ 1 GB. Run it alone (``flock /tmp/cpu-heavy.lock env
OMP_NUM_THREADS=1 ...``): the timings assume one thread.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 1024, 2048, 16, 4
DEFAULT_TOKENIZER = "/work/models/smollm2-135m"
CALIBRATION = dict(num_samples=4, seq_len=128, probe_samples=1)
PRESET = "sparsegpt"  # the cheapest layer solver (the paper's scan); memory is per block whatever the solver


def llama_config(layers: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=layers,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=vocab,
                       max_position_embeddings=2048, tie_word_embeddings=False)


def layers_for(gigabytes: float, vocab: int) -> int:
    """Decoder blocks of a bf16 checkpoint of about ``gigabytes`` (10^9 bytes) at the fixed width."""
    block = 2 * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN * KV_HEADS // HEADS + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN)
    rest = 2 * (2 * vocab * HIDDEN + HIDDEN)
    return max(1, round((gigabytes * 1e9 - rest) / block))


def write_checkpoint(path: Path, layers: int, tokenizer_path: str) -> int:
    """A random bf16 Llama of ``layers`` blocks in 1 GB shards (one shard in memory at a time) with the tokenizer of
    ``tokenizer_path``; returns the bytes of its weights (kept when it already exists)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    done = path / "model.safetensors.index.json"
    if done.is_file():
        return json.loads(done.read_text())["metadata"]["total_size"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = llama_config(layers, len(tokenizer))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    shards, size = [[]], 0
    for name, t in skeleton.state_dict().items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > 10**9:
            shards, size = shards + [[]], 0
        shards[-1].append((name, t.shape))
        size += nbytes
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (torch.ones(s) if n.endswith("norm.weight") else torch.randn(s, generator=generator) * 0.02)
                   .to(torch.bfloat16) for n, s in names}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    config.dtype = torch.bfloat16
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    done.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


# ---------------------------------------------------------------------------------------------- the child
class Sampler(threading.Thread):
    """Peak ``VmRSS``/``RssAnon``/``RssFile`` of this process (MiB), sampled every 20 ms, and ``VmHWM``."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "VmHWM": 0}
        self.stop = threading.Event()

    def sample(self) -> None:
        for line in open("/proc/self/status"):
            key = line.split(":")[0]
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(line.split()[1]) // 1024)

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(0.02)


def child(args: argparse.Namespace) -> None:
    import torch
    import transformers

    import optimum_sparsesched as osp

    loads = []

    class Loads(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("streaming:"):
                loads.append(message)

    logging.getLogger("optimum_sparsesched.sequential").addHandler(Loads())
    logging.getLogger("optimum_sparsesched.sequential").setLevel(logging.INFO)
    text = Path(osp.__file__).parent / "data" / "calibration.txt"
    cfg = osp.SparseScheduleConfig(sparsity=0.5, schedule=args.schedule, dataset=str(text), preset=PRESET,
                                   **CALIBRATION)
    sampler = Sampler()
    sampler.sample()
    base = dict(sampler.peak)
    sampler.start()
    t0 = time.perf_counter()
    out = Path(args.output)
    if args.entry == "stream":
        osp.compress_checkpoint(args.checkpoint, out, cfg)
        save_s = 0.0
    else:
        arch = transformers.AutoConfig.from_pretrained(args.checkpoint)
        device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
        device_map.update({f"model.layers.{i}": "disk" for i in range(arch.num_hidden_layers)})
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.checkpoint, quantization_config=cfg, device_map=device_map, dtype=torch.bfloat16,
            offload_folder=str(out) + "-offload")
        t1 = time.perf_counter()
        model.save_pretrained(out)
        save_s = time.perf_counter() - t1
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    sampler.sample()
    found = re.search(r"(\d+) block loads .*\(([\d.]+) s reading, ([\d.]+) s", loads[-1]) if loads else None
    print("RESULT " + json.dumps({
        "base_rss_mib": base["VmRSS"], "peak_rss_mib": sampler.peak["VmHWM"],
        "peak_sampled_mib": sampler.peak["VmRSS"],
        "peak_anon_mib": sampler.peak["RssAnon"], "peak_file_mib": sampler.peak["RssFile"],
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "seconds": round(seconds, 1), "save_seconds": round(save_s, 1),
        "block_loads": int(found.group(1)) if found else None,
        "read_seconds": float(found.group(2)) if found else None,
        "output_bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}), flush=True)


# ---------------------------------------------------------------------------------------------- the driver
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.5, 1, 2, 4], help="checkpoint sizes in GB")
    ap.add_argument("--entries", nargs="+", default=["offload", "stream"], choices=["offload", "stream"])
    ap.add_argument("--schedules", nargs="+", default=["uniform", "hessian"])
    ap.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sparsesched-memory-scale"),
                    help="where the synthetic checkpoints and outputs go (kept between runs)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    ap.add_argument("--child", nargs=4, metavar=("ENTRY", "SCHEDULE", "CHECKPOINT", "OUTPUT"), help=argparse.SUPPRESS)
    ap.add_argument("--write", nargs=2, metavar=("GIGABYTES", "WORK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.entry, a.schedule, a.checkpoint, a.output = a.child
        child(a)
        return 0
    if a.write:
        from transformers import AutoTokenizer

        layers = layers_for(float(a.write[0]), len(AutoTokenizer.from_pretrained(a.tokenizer)))
        checkpoint = Path(a.write[1]) / f"llama-{HIDDEN}x{INTERMEDIATE}x{layers}"
        print("WROTE " + json.dumps({"layers": layers, "path": str(checkpoint),
                                     "size": write_checkpoint(checkpoint, layers, a.tokenizer)}))
        return 0

    rows = []
    for gigabytes in a.sizes:  # the driver stays small: children write and compress (see ru_maxrss above)
        wrote = subprocess.run([sys.executable, __file__, "--write", str(gigabytes), str(a.work), "--tokenizer",
                                a.tokenizer], capture_output=True, text=True, check=True)
        written = json.loads(wrote.stdout.split("WROTE ", 1)[1])
        layers, checkpoint, size = written["layers"], Path(written["path"]), written["size"]
        for entry in a.entries:
            for schedule in a.schedules:
                output = a.work / f"out-{entry}-{schedule}-{layers}"
                for stale in (output, Path(str(output) + "-offload")):
                    shutil.rmtree(stale, ignore_errors=True)
                run = subprocess.run([sys.executable, __file__, "--child", entry, schedule, str(checkpoint),
                                      str(output)], capture_output=True, text=True)
                if run.returncode != 0:
                    print(run.stderr[-3000:], file=sys.stderr)
                    return 1
                row = {"entry": entry, "schedule": schedule, "layers": layers, "checkpoint_bytes": size,
                       **json.loads(run.stdout.split("RESULT ", 1)[1])}
                rows.append(row)
                print(f"{size / 1e9:5.2f} GB  L={layers:3d}  {entry:7s} {schedule:7s}  peak RSS "
                      f"{row['peak_rss_mib']:5d} MiB (sampled {row['peak_sampled_mib']}, ru_maxrss "
                      f"{row['ru_maxrss_mib']}, anon {row['peak_anon_mib']}, file {row['peak_file_mib']}, base "
                      f"{row['base_rss_mib']})  {row['seconds']:7.1f} s  block loads {row['block_loads']}", flush=True)
                for stale in (output, Path(str(output) + "-offload")):
                    shutil.rmtree(stale, ignore_errors=True)
    summary = {}
    for entry in a.entries:
        for schedule in a.schedules:
            peaks = [r["peak_rss_mib"] for r in rows if r["entry"] == entry and r["schedule"] == schedule]
            summary[f"{entry}/{schedule}"] = {"smallest_to_largest": round(peaks[-1] / peaks[0] - 1, 4),
                                              "spread": round(max(peaks) / min(peaks) - 1, 4),
                                              "largest_peak_mib": peaks[-1]}
    print(json.dumps(summary, indent=1))
    if a.out:
        from common import write_result

        write_result(a.out, {"rows": rows, "summary": summary, "hidden": HIDDEN, "intermediate": INTERMEDIATE,
                             "calibration": CALIBRATION, "preset": PRESET, "threads": os.environ.get("OMP_NUM_THREADS")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
