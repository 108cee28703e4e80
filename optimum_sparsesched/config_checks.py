"""The validation rules of :class:`.config.SparseScheduleConfig`: the allowed values of every option, one table.

Each rule names the option and says what is allowed; a value outside it is a ``ValueError``
``"SparseScheduleConfig: `option`=value is not valid; allowed: ..."`` raised at construction, before any work. The
rules that relate options to each other (a pattern and its sparsity, a range around the target, a search on the
``hessian`` schedule) are in ``SparseScheduleConfig.post_init``.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Callable

from .formats.spec import EXPORT_FORMATS
from .obs.reconstruct import RECONSTRUCT_TARGETS

SCHEDULES = ("hessian", "uniform", "owl", "ramp")
ERROR_METRICS = ("fisher", "kl-alone", "obs")
SOLVERS = ("sparsegpt", "refit", "admm")
#: ``run_compressed``'s layouts besides True (= "compact") and False
RUN_COMPRESSED = ("compact", "int4", "sparse")
#: what a preset sets when ``solver`` / ``search_steps`` / ``reconstruct_epochs`` are not given (the search needs the
#: ``hessian`` schedule; with another schedule a preset's search is off). Measured trade-offs: README, "Presets".
PRESETS = {
    "sparsegpt": {"solver": "sparsegpt", "search_steps": 0, "reconstruct_epochs": 0},
    "default": {"solver": "refit", "search_steps": 0, "reconstruct_epochs": 0},
    "quality": {"solver": "admm", "search_steps": 8, "reconstruct_epochs": 3},
}
MAX_SEARCH_STEPS, MAX_RECONSTRUCT_EPOCHS, MAX_NUM_SAMPLES, MAX_DAMP = 10_000, 1000, 65536, 1.0
SUPPORTED_BITS = (None, 4, 8)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def invalid(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"SparseScheduleConfig: `{name}`={value!r} is not valid; allowed: {allowed}.")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"N:M"`` -> ``(N, M)``: N zeros in every M consecutive input columns. ``None`` -> ``None``."""
    if pattern is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern) if isinstance(pattern, str) else None
    if match is None or not 0 < int(match.group(1)) < int(match.group(2)):
        raise invalid("pattern", pattern, 'None or a string "N:M" with integers 0 < N < M, e.g. "2:4" or "4:8"')
    return int(match.group(1)), int(match.group(2))


def is_int(lo: int, hi: float = math.inf) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def is_number(ok: Callable[[float], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v)


#: the options checked by one rule each: (option, rule, what is allowed)
CHECKS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("sparsity", is_number(lambda v: 0 <= v < 1), "a finite number with 0 <= sparsity < 1"),
    ("schedule", lambda v: v in SCHEDULES, " | ".join(map(repr, SCHEDULES))),
    ("error_metric", lambda v: v in ERROR_METRICS, " | ".join(map(repr, ERROR_METRICS))),
    ("preset", lambda v: v in PRESETS, " | ".join(map(repr, PRESETS))),
    ("solver", lambda v: v in SOLVERS, " | ".join(map(repr, SOLVERS))),
    ("search_steps", is_int(0, MAX_SEARCH_STEPS), f"an integer from 0 (no search) to {MAX_SEARCH_STEPS}"),
    ("reconstruct_epochs", is_int(0, MAX_RECONSTRUCT_EPOCHS), f"an integer from 0 (off) to {MAX_RECONSTRUCT_EPOCHS}"),
    ("reconstruct_lr", is_number(lambda v: 0 < v <= 1), "a number with 0 < reconstruct_lr <= 1 (Adam's step)"),
    ("reconstruct_target", lambda v: v in RECONSTRUCT_TARGETS, " | ".join(map(repr, RECONSTRUCT_TARGETS))),
    ("num_levels", is_int(1), "a positive integer"), ("probe_samples", is_int(1), "a positive integer"),
    ("owl_m", is_number(lambda v: v > 0), "a finite number > 0"),
    ("owl_lambda", is_number(lambda v: v > 0), "a finite number > 0"),
    ("bits", lambda v: v in SUPPORTED_BITS and not isinstance(v, bool), "None, 4 or 8"),
    ("export_format", lambda v: v in EXPORT_FORMATS, " | ".join(map(repr, EXPORT_FORMATS))),
    ("group_size", lambda v: is_int(-1, -1)(v) or is_int(1)(v), "a positive integer or -1 (one grid per output channel)"),
    ("sym", lambda v: isinstance(v, bool), "True or False"),
    ("run_compressed", lambda v: isinstance(v, bool) or v in RUN_COMPRESSED, "True, False, 'compact', 'int4' or 'sparse'"),
    ("seq_len", is_int(1), "a positive integer"), ("block_size", is_int(1), "a positive integer"),
    ("num_samples", is_int(1, MAX_NUM_SAMPLES), f"a positive integer, at most {MAX_NUM_SAMPLES}: every window's "
     "activations are kept in memory (65536 × 2048 tokens at hidden size 4096: 1 TiB in bf16); SparseGPT used 128"),
    ("seed", is_int(*SEED_RANGE), "an integer from -2**63 to 2**64 - 1 (what torch.Generator.manual_seed accepts)"),
    ("damp", is_number(lambda v: 0 < v <= MAX_DAMP), f"a number with 0 < damp <= {MAX_DAMP:g}, the fraction of the mean "
     "Hessian diagonal added to it (SparseGPT uses 0.01); above 1 OBS turns into magnitude pruning"),
    ("modules_to_not_convert", lambda v: isinstance(v, list) and all(isinstance(m, str) and m for m in v),
     "None, a module name, or a list of non-empty module names"),
    ("checkpoint_dir", lambda v: v is None or (isinstance(v, str) and bool(v) and not os.path.isfile(v)),
     "None or a folder path (created if missing; an existing run there is resumed)"),
    ("tokenizer", lambda v: v is None or (bool(v.strip()) if isinstance(v, str) else callable(v)),
     "None (the model's own), a tokenizer object (callable on text), or a model name/path"),
]


