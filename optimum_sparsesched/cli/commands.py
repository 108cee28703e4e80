"""The commands: ``compress`` (:func:`_compress`; checkpoint to checkpoint in :func:`_compress_streaming`),
``eval`` (:func:`_eval`) and ``push`` (:func:`_push`), dispatched by :func:`main`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .inputs import (EMBEDDED, UsageError, check_eval_text, check_model_ref, check_output_folder,
                         check_text_source, config_from_args, load_model, parse_tasks)
from .options import SUMMARY_OPTIONS, build_parser
from .checks import cli_error, saved_contents


def _say(message: str) -> None:  # progress and measurements go to stderr, the summary to stdout
    print(message, file=sys.stderr, flush=True)


def _measure(model: Any, tok: Any, text: str, protocol: dict[str, Any]) -> Any:
    from ..eval.perplexity import perplexity_report

    try:
        return perplexity_report(model, tok, text, **protocol)
    except ValueError as exc:  # an option of the protocol is named as it is; a text too short by its file
        raise cli_error(exc, f"{Path(text).name}: ") from None


def _check_zero_shot(a: argparse.Namespace, tasks: list[str]) -> None:
    """``--tasks``, ``--limit``, ``--num-fewshot``, ``--batch-size`` and ``--task-path`` checked (every task known to
    lm-eval) before a model is loaded, so a typo is refused before the compression rather than after it."""
    from ..eval.zero_shot import check_zero_shot

    if not tasks:
        return
    try:
        check_zero_shot(tasks, limit=a.limit, num_fewshot=a.num_fewshot, batch_size=a.batch_size,
                        task_paths=a.task_path)
    except (ValueError, ImportError) as exc:
        message = str(exc)
        for option, flag in (("tasks:", "--tasks:"), ("limit:", "--limit:"), ("num_fewshot:", "--num-fewshot:"),
                             ("batch_size:", "--batch-size:"), ("task_paths:", "--task-path:")):
            message = message.replace(option, flag, 1) if message.startswith(option) else message
        raise UsageError(message) from None


def _zero_shot(model: Any, tok: Any, a: argparse.Namespace, tasks: list[str]) -> dict[str, Any]:
    from ..eval.zero_shot import zero_shot

    try:
        return zero_shot(model, tok, tasks, limit=a.limit, num_fewshot=a.num_fewshot, batch_size=a.batch_size,
                         task_paths=a.task_path)
    except (ValueError, ConnectionError) as exc:  # bad tasks, or their data out of reach
        raise UsageError(str(exc)) from None


def _eval(a: argparse.Namespace) -> int:
    import torch

    from .default_model import EVALUATION_TEXT

    tasks = parse_tasks(a.tasks, a.task_path)
    _check_zero_shot(a, tasks)
    text = check_eval_text(a.dataset or str(EVALUATION_TEXT), "--dataset")
    loaded = load_model(a.model, a.dtype, _say, a.tokenizer, run_compressed=a.run_compressed)
    if torch.cuda.is_available():
        loaded.model.cuda()
    protocol = dict(seq_len=a.seq_len, max_windows=a.max_windows, stride=a.stride)
    report = _measure(loaded.model, loaded.tokenizer, text, protocol)
    result: dict[str, Any] = {"model": a.model, "weights": loaded.source, "perplexity": report.value,
                              "protocol": report.protocol, "seq_len": report.seq_len, "windows": report.windows}
    print(f"perplexity {report}", file=sys.stderr if a.json else sys.stdout, flush=True)
    if tasks:
        accuracies = _zero_shot(loaded.model, loaded.tokenizer, a, tasks)
        result["tasks"] = {t: {**r.metrics, "samples": r.samples, "num_fewshot": r.num_fewshot}
                           for t, r in accuracies.items()}
        if not a.json:
            for t, r in accuracies.items():
                print(f"{t}: " + ", ".join(f"{m} {v:.4f}" for m, v in r.metrics.items())
                      + f" ({r.num_fewshot}-shot, {r.samples} documents)")
    if a.json:
        print(json.dumps(result, indent=1))
    return 0


def _save(loaded: Any, out: Path, overwrite: bool) -> None:
    loaded.model.save_pretrained(out, overwrite=overwrite)
    loaded.tokenizer.save_pretrained(out)


def load_compress_save(model_ref: str | None, cfg: Any, out: Path | None, dtype: str,
                       on_loaded: Any = None, on_compressed: Any = None, overwrite: bool = False) -> Any:
    """The "load + compress + save" step as one call: load ``model_ref`` (None: the embedded default) in
    ``dtype``, check ``cfg`` against it, run ``on_loaded(loaded)`` (measurements before), compress, run
    ``on_compressed(loaded)`` (measurements after, recorded in the card), save model, tokenizer and card to ``out``
    (None: nothing is saved). Returns the :class:`.cli_inputs.LoadedModel` with ``seconds`` (compression time)."""
    from ..pipeline.distributed import is_main_process
    from ..pipeline.plan import plan_compression
    from ..pipeline.residency import plan_residency
    from ..quantizer import compress

    loaded = load_model(model_ref, dtype, _say, cfg.tokenizer, source=True)  # a causal LM, whole, finite
    try:
        plan = plan_compression(loaded.model, cfg.plan_spec())  # seq_len, modules_to_not_convert, pattern
        plan_residency(loaded.model, plan, cfg.residency_spec())  # max_device_memory: before the measurements
        if on_loaded is not None:
            on_loaded(loaded)
        t0 = time.perf_counter()
        compress(loaded.model, cfg, tokenizer=loaded.tokenizer)
        loaded.seconds = time.perf_counter() - t0
        if not is_main_process():
            return loaded  # under torchrun, rank 0 measures and saves
        try:
            if on_compressed is not None:
                on_compressed(loaded)
        except Exception:  # the measurements failed (e.g. a task's data out of reach): the compression is kept
            if out is not None:
                _save(loaded, out, overwrite)
                _say(f"saved the compressed model to {out} (without the measurements after compression, which "
                     "failed)")
            raise
        if out is not None:
            _save(loaded, out, overwrite)
    except ValueError as exc:
        raise cli_error(exc) from None
    return loaded


def _compress(a: argparse.Namespace) -> int:
    from .default_model import EVALUATION_TEXT
    from ..pipeline.distributed import is_main_process
    from ..pipeline.plan import module_sizes
    from ..publish.model_card import record_eval_result, record_zero_shot
    from ..schedule.allocators import weighted_mean

    out = check_output_folder(a.out, a.output, a.model, a.overwrite)
    cfg = config_from_args(a)
    check_model_ref(a.model, a.tokenizer)
    check_text_source(cfg.dataset, "--dataset")
    tasks = parse_tasks(a.tasks, a.task_path)
    _check_zero_shot(a, tasks)
    measured = bool(tasks) or a.eval_dataset is not None or (a.eval_text is not None and not a.no_eval)
    if a.model is not None and out is not None and not measured:  # checkpoint to checkpoint, one block in memory
        return _compress_streaming(a, cfg, out)
    texts = [] if a.no_eval else [check_eval_text(a.eval_text or str(EVALUATION_TEXT), "--eval-text")]
    if a.eval_dataset is not None:
        texts.append(check_eval_text(a.eval_dataset, "--eval-dataset"))
    windows = a.eval_windows if a.eval_windows is not None or a.model else EMBEDDED["eval_windows"]
    protocol = dict(seq_len=a.eval_seq_len, max_windows=windows, stride=a.eval_stride)
    summary: dict[str, Any] = {}

    def measure_before(loaded: Any) -> None:
        for k, text in enumerate(texts):  # every text checked (window length, enough tokens) before compressing
            if k == 0:
                summary["before"] = _measure(loaded.model, loaded.tokenizer, text, protocol)
                _say(f"perplexity before: {summary['before']}")
            else:
                _check_windows(loaded, text, protocol)

    def measure_after(loaded: Any) -> None:
        for k, text in enumerate(texts):
            report = _measure(loaded.model, loaded.tokenizer, text, protocol)
            record_eval_result(loaded.model, report.value, dataset=text, seq_len=report.seq_len,
                               windows=report.windows)
            summary["after" if k == 0 else f"ppl_after {report.text}"] = report
        if tasks:
            summary["tasks"] = _zero_shot(loaded.model, loaded.tokenizer, a, tasks)
            record_zero_shot(loaded.model, summary["tasks"])

    loaded = load_compress_save(a.model, cfg, out, a.dtype, on_loaded=measure_before, on_compressed=measure_after,
                                overwrite=a.overwrite)
    if not is_main_process():
        return 0
    achieved = cfg.results.layer_sparsities
    report: dict[str, Any] = {"model": a.model or "SmolLM2-135M (embedded)", "weights": loaded.source,
                              "sparsity": round(weighted_mean(achieved, module_sizes(loaded.model, achieved)), 4),
                              **{k: getattr(cfg, k) for k in SUMMARY_OPTIONS}}
    if cfg.results.resolved_range:
        report["sparsity_range"] = [round(x, 3) for x in cfg.results.resolved_range]
    report["compress_seconds"] = round(loaded.seconds, 1)
    if "after" in summary:
        report.update(ppl_before=round(summary["before"].value, 3), ppl_after=round(summary["after"].value, 3),
                      eval=summary["after"].protocol)
    report.update({k: round(v.value, 3) for k, v in summary.items() if k.startswith("ppl_after ")})
    if "tasks" in summary:
        report["tasks"] = {t: {m: round(v, 4) for m, v in r.metrics.items()} for t, r in summary["tasks"].items()}
    if out is not None:
        report["saved"] = str(out)
    _print_summary(report, a.json, out)
    return 0


def _compress_streaming(a: argparse.Namespace, cfg: Any, out: Path) -> int:
    """``compress MODEL OUT``, no measurement asked: :func:`.streaming.compress_checkpoint` (``eval OUT`` measures)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .. import compress_checkpoint
    from ..pipeline.distributed import is_main_process
    from ..pipeline.plan import module_sizes
    from ..schedule.allocators import weighted_mean

    t0 = time.perf_counter()
    try:
        compress_checkpoint(a.model, out, cfg, dtype=a.dtype, overwrite=a.overwrite)
    except ValueError as exc:
        raise cli_error(exc) from None
    if is_main_process():
        with torch.device("meta"):  # module sizes from a weightless skeleton
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
        achieved = cfg.results.layer_sparsities
        _print_summary({"model": a.model, "weights": "streamed block by block from the checkpoint's shards",
                        "sparsity": round(weighted_mean(achieved, module_sizes(skeleton, achieved)), 4),
                        **{k: getattr(cfg, k) for k in SUMMARY_OPTIONS},
                        "compress_seconds": round(time.perf_counter() - t0, 1),
                        "perplexity": f"optimum-sparsesched eval {out}", "saved": str(out)}, a.json, out)
    return 0


def _check_windows(loaded: Any, text: str, protocol: dict[str, Any]) -> None:
    from ..eval.perplexity import check_protocol, default_seq_len, eval_spans, read_eval_text

    seq_len = protocol["seq_len"] or default_seq_len(loaded.model)
    check_protocol(loaded.model, seq_len, protocol["stride"], protocol["max_windows"])
    n = len(loaded.tokenizer(read_eval_text(text), add_special_tokens=False).input_ids)
    try:
        eval_spans(n, seq_len)
    except ValueError as exc:
        raise UsageError(f"{Path(text).name}: {exc}") from None


def _print_summary(summary: dict[str, Any], as_json: bool, out: Path | None) -> None:
    if as_json:
        print(json.dumps(summary, indent=1))
        return
    if "ppl_after" in summary:
        print(f"perplexity {summary['ppl_before']:.2f} -> {summary['ppl_after']:.2f} ({summary['eval']})")
    for key, value in summary.items():
        if key not in ("ppl_before", "ppl_after", "eval", "saved") and value is not None:
            print(f"  {key:18s} {value}")
    if out is not None:
        print(f"saved to {out} ({saved_contents(out)}); reload with: import optimum_sparsesched; "
              f"AutoModelForCausalLM.from_pretrained({str(out)!r})")
    else:
        print("nothing was saved: add -o OUT (or MODEL OUT) to save the compressed model")


def _push(a: argparse.Namespace) -> int:
    from .. import push_to_hub

    try:
        url = push_to_hub(a.out, a.repo_id, private=True if a.private else None, commit_message=a.commit_message,
                          revision=a.revision, endpoint=a.endpoint, include=a.include)
    except (ValueError, ConnectionError) as exc:  # bad input, or the Hub out of reach
        raise cli_error(exc) from None
    print(url)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "optimum-sparsesched") -> int:
    try:
        a = build_parser(prog).parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad option (2, one line printed)
        return int(exc.code or 0)
    try:
        return {"compress": _compress, "eval": _eval, "push": _push}[a.command](a)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
