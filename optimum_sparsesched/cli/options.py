"""The command line's options: ``compress`` (every option of :class:`.config.SparseScheduleConfig`, with the
defaults actually used and their choices in ``--help``), ``eval`` and ``push``."""

from __future__ import annotations

import argparse
import inspect
from typing import Any

from .inputs import DTYPES, EMBEDDED
from ..config import ERROR_METRICS, EXPORT_FORMATS, PRESETS, SCHEDULES, SOLVERS, SparseScheduleConfig
from ..obs.reconstruct import RECONSTRUCT_TARGETS
from ..eval.perplexity import DEFAULT_SEQ_LEN


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)``, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: the options the compress summary prints
SUMMARY_OPTIONS = ("pattern", "bits", "schedule", "preset", "solver", "search_steps", "reconstruct_epochs")


def _compress_parser(sub: Any) -> None:
    d = {k: p.default for k, p in inspect.signature(SparseScheduleConfig.__init__).parameters.items()}
    c = sub.add_parser("compress", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="compress a model (the embedded SmolLM2-135M when MODEL is omitted) and save it",
                       description="Compress MODEL (a folder or hub id; omitted: the embedded SmolLM2-135M) and save "
                       "it to OUT. Defaults in [brackets]; 'embedded:' gives the default used without MODEL.")
    c.add_argument("model", nargs="?", default=None, help="model folder or hub id [the embedded SmolLM2-135M]")
    c.add_argument("out", nargs="?", default=None, help="folder to save the compressed checkpoint in (same as -o)")
    c.add_argument("-o", "--output", default=None, metavar="OUT", help="folder to save the compressed checkpoint "
                   "in; without it nothing is saved")
    g = c.add_argument_group("compression")
    g.add_argument("--sparsity", type=float, default=d["sparsity"], help=f"target fraction of zeros, 0 <= s < 1 "
                   f"[{d['sparsity']}]")
    g.add_argument("--schedule", default=None, choices=SCHEDULES, help="how the target is spread over layers "
                   "[hessian; uniform with --pattern]")
    g.add_argument("--pattern", default=None, help='N zeros in every M inputs, "N:M" with 0 < N < M, e.g. 2:4; '
                   "needs --sparsity N/M [none: unstructured]")
    g.add_argument("--bits", type=int, default=None, choices=[4, 8], help="GPTQ-quantize the kept weights [none]")
    g.add_argument("--group-size", type=int, default=d["group_size"], help="quantization group along the inputs, "
                   f"> 0 or -1 (per output channel) [{d['group_size']}]")
    g.add_argument("--sym", action="store_true", help="symmetric quantization grid [asymmetric]")
    g.add_argument("--preset", default=d["preset"], choices=list(PRESETS), help="solver, search and reconstruction "
                   "when not given: " + "; ".join(f"{k}: {v['solver']}, {v['search_steps']} search steps, "
                                                  f"{v['reconstruct_epochs']} reconstruction epochs"
                                                  for k, v in PRESETS.items())
                   + f" [{d['preset']}]")
    g.add_argument("--solver", default=None, choices=SOLVERS, help="layer solver: sparsegpt (the OBS scan), refit "
                   "(its kept weights refitted exactly), admm (mask searched by ADMM, then refitted) [the preset's: "
                   f"{PRESETS[d['preset']]['solver']}]")
    g.add_argument("--reconstruct-epochs", type=int, default=None, help="epochs of block reconstruction: the kept "
                   "weights of each block fitted to the dense block's outputs (mask fixed), 0 = off [the preset's: "
                   f"{PRESETS[d['preset']]['reconstruct_epochs']}]")
    g.add_argument("--reconstruct-lr", type=float, default=d["reconstruct_lr"], help="Adam learning rate of the "
                   f"block reconstruction [{d['reconstruct_lr']}]")
    g.add_argument("--reconstruct-target", default=d["reconstruct_target"], choices=RECONSTRUCT_TARGETS,
                   help="what block reconstruction fits: dense (the dense model's block outputs, a second stream of "
                   "hidden states) or local (the dense block's outputs on the compressed inputs, one forward less) "
                   f"[{d['reconstruct_target']}]")
    g.add_argument("--damp", type=float, default=d["damp"], help=f"Hessian damping, fraction of mean(diag H) "
                   f"[{d['damp']}]")
    g.add_argument("--block-size", type=int, default=d["block_size"], help=f"OBS column block [{d['block_size']}]")
    g.add_argument("--modules-to-not-convert", nargs="+", default=None, metavar="NAME",
                   help=f"module names or suffixes left untouched [{' '.join(d['modules_to_not_convert'])}]")
    s = c.add_argument_group("schedule")
    s.add_argument("--error-metric", default=d["error_metric"], choices=ERROR_METRICS,
                   help=f"hessian schedule's damage estimate [{d['error_metric']}]")
    s.add_argument("--probe-samples", type=int, default=None, help=f"calibration windows that measure the "
                   f"schedule [{d['probe_samples']}; embedded: {EMBEDDED['probe_samples']}]")
    s.add_argument("--sparsity-range", default=d["sparsity_range"], metavar="auto|LO,HI",
                   help=f"range of per-layer sparsities, 0 <= LO <= sparsity <= HI < 1 [{d['sparsity_range']}]")
    s.add_argument("--num-levels", type=int, default=d["num_levels"], help=f"hessian log-error levels "
                   f"[{d['num_levels']}]")
    s.add_argument("--search-steps", type=int, default=None, help="steps of the KL-scored allocation search on the "
                   f"hessian schedule, 0 = none [the preset's: {PRESETS[d['preset']]['search_steps']}]")
    s.add_argument("--owl-m", type=float, default=d["owl_m"], help=f"OWL outlier threshold M [{d['owl_m']}]")
    s.add_argument("--owl-lambda", type=float, default=d["owl_lambda"], help=f"OWL sparsity spread "
                   f"[{d['owl_lambda']}]")
    k = c.add_argument_group("calibration")
    k.add_argument("--dataset", default=None, help="calibration text: .txt file or folder, or a hub name "
                   "(wikitext2, c4: needs the Hub) [wikitext2; embedded: the shipped calibration.txt]")
    k.add_argument("--num-samples", type=int, default=None, help=f"calibration windows [{d['num_samples']}; "
                   f"embedded: {EMBEDDED['num_samples']}]")
    k.add_argument("--seq-len", type=int, default=None, help=f"tokens per calibration window, at most the model's "
                   f"positions [{d['seq_len']}; embedded: {EMBEDDED['seq_len']}]")
    k.add_argument("--seed", type=int, default=d["seed"], help=f"window sampling seed [{d['seed']}]")
    k.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH", help="tokenizer folder or hub id [MODEL's own]")
    r = c.add_argument_group("run and output")
    r.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype the model is loaded and compressed "
                   "in [float32]")
    r.add_argument("--export-format", default=d["export_format"], choices=EXPORT_FORMATS,
                   help=f"how OUT stores the compressed weights [{d['export_format']}]")
    r.add_argument("--overwrite", action="store_true", help="replace a model this package did not write in OUT, "
                   "or MODEL's own folder [refused]")
    r.add_argument("--checkpoint-dir", default=None, help="save every finished block there; a rerun resumes [none]")
    r.add_argument("--max-device-memory", default=None, help='compute-device budget, e.g. "20GiB" [no cap]')
    e = c.add_argument_group("evaluation (perplexity before and after; the same protocol as `eval`)")
    _eval_options(e, prefix="eval-")
    e.add_argument("--no-eval", action="store_true", help="skip the perplexity before and after")
    e.add_argument("--eval-dataset", default=None, help="another text file whose perplexity after compression is "
                   "recorded in the model card too")
    _task_options(e)
    c.add_argument("--json", action="store_true", help="print the summary as JSON")


def _eval_options(group: Any, prefix: str = "") -> None:
    text = "--eval-text" if prefix else "--dataset"
    group.add_argument(text, default=None, help="text file to measure perplexity on [the shipped evaluation.txt]")
    group.add_argument(f"--{prefix}seq-len", type=int, default=None, help=f"tokens per window [{DEFAULT_SEQ_LEN}, "
                       "or the model's positions when fewer]")
    embedded = f"; embedded: {EMBEDDED['eval_windows']}" if prefix else ""
    group.add_argument(f"--{prefix}{'windows' if prefix else 'max-windows'}", type=int, default=None,
                       help=f"evaluate at most this many windows [all{embedded}]")
    group.add_argument(f"--{prefix}stride", type=int, default=None, help="strided windows starting every STRIDE "
                       "tokens [none: non-overlapping]")


def _task_options(group: Any) -> None:
    group.add_argument("--tasks", default=None, help="lm-eval tasks for zero-shot accuracy, comma-separated, e.g. "
                       "hellaswag,arc_easy (needs optimum-sparsesched[eval]; their data from the Hub) [none]")
    group.add_argument("--task-path", action="append", default=[], help="folder or YAML of extra lm-eval tasks "
                       "(repeatable)")
    group.add_argument("--limit", type=int, default=None, help="at most this many documents per task [all]")
    group.add_argument("--num-fewshot", type=int, default=0, help="examples in each prompt [0]")
    group.add_argument("--batch-size", type=int, default=8, help="documents per forward pass [8]")


def build_parser(prog: str = "optimum-sparsesched") -> argparse.ArgumentParser:
    ap = Parser(prog=prog, description="SparseGPT compression with layer-wise sparsity schedules")
    sub = ap.add_subparsers(dest="command", required=True)
    _compress_parser(sub)
    e = sub.add_parser("eval", help="perplexity (and lm-eval accuracies) of a model folder or hub id",
                       description="Perplexity of MODEL on a text (the protocol `compress` prints), and zero-shot "
                       "accuracies with lm-evaluation-harness. Defaults in [brackets].")
    e.add_argument("model", help="model folder (a compressed checkpoint or any other) or hub id")
    _eval_options(e)
    _task_options(e)
    e.add_argument("--dtype", default="float32", choices=(*DTYPES, "auto"), help="dtype the model is loaded in; auto: "
                   "the one it was saved in [float32]")
    e.add_argument("--run-compressed", nargs="?", const="compact", default=False, choices=("compact", "int4", "sparse"),
                   help="keep the compressed Linears of a checkpoint this package saved compressed in memory: compact "
                   "(the default when given alone; decoded inside each forward: same outputs, least memory, slower) "
                   "or int4 (4-bit checkpoints on the CPU: torch's int4 matmul, faster than compact) or sparse (compact, "
                   "decoding steps on the CPU run by a C kernel compiled at load: fast and small; needs a C compiler) "
                   "[decoded at load]")
    e.add_argument("--tokenizer", default=None, metavar="NAME_OR_PATH", help="tokenizer folder or hub id [MODEL's own]")
    e.add_argument("--json", action="store_true", help="print the results as JSON")
    p = sub.add_parser("push", help="upload a saved compressed checkpoint (with its model card) to the Hub")
    p.add_argument("out", help="folder that save_pretrained (or `compress MODEL OUT`) wrote")
    p.add_argument("repo_id", help="model repo, 'owner/name' or 'name' (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--endpoint", default=None, help="Hub URL (default: huggingface_hub's, i.e. HF_ENDPOINT)")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN", help="also upload the files "
                   "matching PATTERN (repeatable; e.g. '*' for the whole folder) [the checkpoint's own files: "
                   "weights, index, configs, tokenizer, card, plot]")
    return ap
