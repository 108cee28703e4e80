#!/usr/bin/env python3
"""What a compressed model costs in memory and speed once loaded: the dense model, a compressed checkpoint decoded at
load, and the same checkpoint with ``run_compressed=True`` (Linears kept compact, decoded inside their forward),
``run_compressed="sparse"`` (the same compact Linears, each decoding step run by the package's compiled sparse
kernel) and, for 4-bit rows, ``run_compressed="int4"`` (every weight's 4-bit code run by torch's CPU int4 matmul).

Each case runs in a fresh process (``_case``): the baseline is its resident memory after the imports and the setup
every case shares (the architecture's modules, imported by building a weightless skeleton of the model on the meta
device; the tokenizer, loaded and the prompt encoded: about 46 MiB, not the model's); it then loads
the model (peak resident memory above the baseline during the load), measures the bytes of the decoder's weights
as they sit in memory (parameters and buffers of the decoder blocks), generates ``--tokens`` tokens greedily from a
short prompt (peak above the baseline over load + generate, tokens/s over the generated tokens, CPU seconds), and
prints the generated ids (the compact model must produce the decoded one's tokens). Two peaks: ``VmHWM`` (all
resident pages, the file-backed pages of the mmapped checkpoint included, which the kernel can drop) and the
anonymous memory the process allocated (``RssAnon``, sampled every 10 ms: :class:`AnonPeak`).

With ``--repeats N`` every case runs N times, each in a fresh process, and the table gives the median of each
figure with the range of the peak: the load's peak varies from run to run by tens of MiB in every mode
(transformers materializes the checkpoint's tensors in 4 threads, ahead of their use by a varying amount).

    # 1. the checkpoints (SparseGPT scan, uniform schedule, a short calibration: their quality is not the point)
    python benchmarks/inference_memory.py prepare MODEL_DIR WORK_DIR [--rows 0.5 0.7 0.7+4 2:4+4]
    # 2. the measurements, one fresh process per case
    OMP_NUM_THREADS=2 python benchmarks/inference_memory.py run MODEL_DIR WORK_DIR [--dtype bfloat16] \\
        [--tokens 128] [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CALIBRATION_FILE, wikitext_calibration_text, write_result  # noqa: E402

PROMPT = "The history of the city begins in the Roman period, when"


def row_config(row: str, args: argparse.Namespace):
    """``"0.7"``, ``"0.7+4"``, ``"2:4+4"`` -> the SparseScheduleConfig of that row."""
    from optimum_sparsesched import SparseScheduleConfig

    sparsity, _, bits = row.partition("+")
    pattern = sparsity if ":" in sparsity else None
    value = int(pattern.split(":")[0]) / int(pattern.split(":")[1]) if pattern else float(sparsity)
    return SparseScheduleConfig(sparsity=value, pattern=pattern, bits=int(bits) if bits else None,
                                group_size=args.group_size, schedule="uniform", preset="sparsegpt",
                                dataset=wikitext_calibration_text(CALIBRATION_FILE), num_samples=args.num_samples,
                                seq_len=args.seq_len)


def prepare(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from optimum_sparsesched import compress_checkpoint

    for row in args.rows:
        out = Path(args.work) / row.replace(":", "of")
        if (out / "config.json").is_file():
            print(f"{out} exists")
            continue
        start = time.perf_counter()
        compress_checkpoint(args.model, out, row_config(row, args), dtype="bfloat16")
        AutoTokenizer.from_pretrained(args.model).save_pretrained(out)
        print(f"{row}: compressed into {out} in {time.perf_counter() - start:.0f} s", flush=True)


def _kib(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class AnonPeak:
    """The peak of the process's anonymous resident memory (``RssAnon``: what the process allocated, without the
    file-backed pages of mmapped checkpoints that ``VmHWM`` also counts), sampled every ``interval`` seconds in a
    thread (a spike shorter than that can be missed)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.peak, self.interval, self._stop = _kib("RssAnon"), interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _kib("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _kib("RssAnon"))


def case(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import torch
    import transformers

    import optimum_sparsesched

    config = transformers.AutoConfig.from_pretrained(args.folder)
    with torch.device("meta"):  # the architecture's modules imported (lazily, by transformers) before the baseline
        transformers.AutoModelForCausalLM.from_config(config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.folder)  # ~46 MiB, the same for every case
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    base, base_anon = _kib("VmRSS"), _kib("RssAnon")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM (the peak) counts from here
    extra = {}
    if args.mode in ("compact", "int4", "sparse"):
        extra["quantization_config"] = optimum_sparsesched.SparseScheduleConfig(run_compressed=args.mode)
    dtype = getattr(torch, args.dtype)
    anon = AnonPeak()
    cpu0, start = time.process_time(), time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.folder, dtype=dtype, **extra).eval()
    load_s, load_cpu = time.perf_counter() - start, time.process_time() - cpu0
    load_peak, load_anon_peak = _kib("VmHWM") - base, anon.stop() - base_anon
    anon = AnonPeak()
    held = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers()) if ".layers." in n}
    decoder_bytes = sum(t.numel() * t.element_size() for t in held.values())
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)  # first-call costs (caches, lazy imports)
        cpu0, start = time.process_time(), time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        gen_s, gen_cpu = time.perf_counter() - start, time.process_time() - cpu0
    anon_peak = max(load_anon_peak, anon.stop() - base_anon)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"folder": Path(args.folder).name, "mode": args.mode, "dtype": args.dtype,
                      "threads": torch.get_num_threads(), "baseline_kib": base, "load_peak_kib": load_peak,
                      "peak_kib": _kib("VmHWM") - base, "held_after_kib": _kib("VmRSS") - base,
                      "load_anon_peak_kib": load_anon_peak, "anon_peak_kib": anon_peak,
                      "rss_file_after_kib": _kib("RssFile"),
                      "decoder_bytes": decoder_bytes, "load_s": load_s, "load_cpu_s": load_cpu,
                      "tokens": args.tokens, "generate_s": gen_s, "generate_cpu_s": gen_cpu,
                      "tokens_per_s": args.tokens / gen_s, "process_cpu_s": usage.ru_utime + usage.ru_stime,
                      "generated": out[0, ids.shape[1]:].tolist()}))


def run(args: argparse.Namespace) -> None:
    work = Path(args.work)
    folders = [(Path(args.model), "dense")]
    for row in args.rows:
        folder = work / row.replace(":", "of")
        folders += [(folder, "decoded"), (folder, "compact"), (folder, "sparse")]
        folders += [(folder, "int4")] if row.endswith("+4") else []
    rows, runs = [], []
    for folder, mode in folders:
        repeats = []
        for _ in range(args.repeats):
            command = [sys.executable, __file__, "_case", str(folder), mode, "--dtype", args.dtype, "--tokens",
                       str(args.tokens)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if done.returncode != 0:
                raise RuntimeError(f"{folder.name} {mode}: {done.stderr[-3000:]}")
            repeats.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps({k: v for k, v in repeats[-1].items() if k != "generated"}), flush=True)
        runs += repeats
        rows.append(_median_row(repeats))
    dense = rows[0]
    print(f"\n| checkpoint | mode | decoder weights in memory | vs dense | peak load | peak load + generate | vs dense "
          f"| range of the peak | anonymous peak | vs dense | tokens/s | vs dense | same tokens as decoded |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    decoded = {r["folder"]: r["generated"] for r in rows if r["mode"] == "decoded"}
    for r in rows:
        same = "-" if r["mode"] in ("dense", "decoded") else str(r["generated"] == decoded[r["folder"]])
        print(f"| {r['folder']} | {r['mode']} | {r['decoder_bytes'] / 2**20:.1f} MiB | "
              f"{r['decoder_bytes'] / dense['decoder_bytes']:.1%} | {r['load_peak_kib'] / 1024:.0f} MiB | "
              f"{r['peak_kib'] / 1024:.0f} MiB | {r['peak_kib'] / dense['peak_kib']:.1%} | "
              f"{r['peak_min_kib'] / 1024:.0f}–{r['peak_max_kib'] / 1024:.0f} MiB | "
              f"{r['anon_peak_kib'] / 1024:.0f} MiB | {r['anon_peak_kib'] / dense['anon_peak_kib']:.1%} | "
              f"{r['tokens_per_s']:.2f} | {r['tokens_per_s'] / dense['tokens_per_s']:.2f}x | {same} |")
    if args.json:
        write_result(args.json, {"dtype": args.dtype, "tokens": args.tokens, "repeats": args.repeats, "rows": rows,
                                 "runs": runs, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")})


def _median_row(repeats: list[dict]) -> dict:
    """One case's figures over its repeated runs: the median of every number (the generated ids of the first run:
    greedy decoding gives the same ids in every run), and the peak's range."""
    row = dict(repeats[0])
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            row[key] = statistics.median(r[key] for r in repeats)
    row["peak_min_kib"] = min(r["peak_kib"] for r in repeats)
    row["peak_max_kib"] = max(r["peak_kib"] for r in repeats)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("prepare", "run"):
        p = sub.add_parser(name)
        p.add_argument("model")
        p.add_argument("work")
        p.add_argument("--rows", nargs="+", default=["0.5", "0.7", "0.7+4", "2:4+4"])
        p.add_argument("--group-size", type=int, default=128)
        p.add_argument("--num-samples", type=int, default=8)
        p.add_argument("--seq-len", type=int, default=256)
        p.add_argument("--dtype", default="bfloat16")
        p.add_argument("--tokens", type=int, default=128)
        p.add_argument("--json", type=Path, default=None)
        p.add_argument("--repeats", type=int, default=1, help="fresh processes per case (the table: medians)")
    c = sub.add_parser("_case")
    c.add_argument("folder")
    c.add_argument("mode", choices=["dense", "decoded", "compact", "sparse", "int4"])
    c.add_argument("--dtype", default="bfloat16")
    c.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    {"prepare": prepare, "run": run, "_case": case}[args.command](args)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
