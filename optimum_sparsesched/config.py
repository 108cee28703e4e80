"""`SparseScheduleConfig`: every option of a compression run, validated at construction.

The config is a transformers `QuantizationConfigMixin` registered under ``quant_method="sparse_schedule"``,
so it travels in ``config.json`` of a compressed checkpoint. What a run achieved is kept apart, in
``config.results`` (:class:`.results.CompressionResults`); :meth:`SparseScheduleConfig.options_dict` is the options
alone, and the part of them that decides the compressed weights is :meth:`SparseScheduleConfig.fingerprint_options`.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

from transformers.utils.quantization_config import QuantizationConfigMixin

from .results import RESULT_FIELDS, CompressionResults

QUANT_METHOD = "sparse_schedule"

SCHEDULES = ("hessian", "uniform", "owl", "ramp")
ERROR_METRICS = ("kl-alone", "obs")
SOLVERS = ("sparsegpt", "refit", "admm")
#: what a preset sets when ``solver`` / ``search_steps`` / ``reconstruct_epochs`` are not given (the search needs the
#: ``hessian`` schedule; with another schedule a preset's search is off). Measured trade-offs: README, "Presets".
PRESETS = {
    "sparsegpt": {"solver": "sparsegpt", "search_steps": 0, "reconstruct_epochs": 0},
    "default": {"solver": "refit", "search_steps": 0, "reconstruct_epochs": 0},
    "quality": {"solver": "admm", "search_steps": 8, "reconstruct_epochs": 3},
}
MAX_SEARCH_STEPS = 10_000
MAX_RECONSTRUCT_EPOCHS = 1000
HUB_DATASETS = ("wikitext2", "c4")
SUPPORTED_BITS = (None, 4, 8)
MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MEMORY_FORMS = ('None, a positive int number of bytes, or a string like "2GiB", "512MB", "1.5GB" '
                "(units B, KB/MB/GB/TB = powers of 1000, KiB/MiB/GiB/TiB = powers of 1024)")
EXPORT_FORMATS = ("compact", "dense", "compressed-tensors")
#: options that decide where and how a run works or saves, not the compressed weights: left out of the fingerprint
#: (``dataset`` and ``tokenizer`` enter it through the calibration token windows they produce)
OUTPUT_NEUTRAL_OPTIONS = ("checkpoint_dir", "max_device_memory", "export_format", "dataset", "tokenizer")
#: options of optimum-sparsesched 0.1.0 that are gone; a saved config that has them still loads
RETIRED_OPTIONS = ("granularity",)
#: options that name a place on this machine: never written into config.json, a model card or an upload
LOCAL_OPTIONS = ("checkpoint_dir",)
#: ``seed`` range: what ``torch.Generator.manual_seed`` accepts
SEED_RANGE = (-(2**63), 2**64 - 1)
#: upper bound of ``damp`` (a fraction of the mean Hessian diagonal), with the reason given in the error
MAX_DAMP = 1.0
#: upper bound of ``num_samples``, with the reason given in the error
MAX_NUM_SAMPLES = 65536


#: key of ``config.json`` that keeps this package's config when ``quantization_config`` holds another format's
#: (``export_format="compressed-tensors"``)
SAVED_CONFIG_KEY = "sparse_schedule_config"


def saved_config_dict(config_json: Any) -> dict[str, Any] | None:
    """This package's config as saved in a checkpoint's ``config.json`` (a dict), whatever ``export_format`` wrote
    it; ``None`` when the checkpoint was not compressed by this package."""
    if not isinstance(config_json, dict):
        return None
    for qc in (config_json.get("quantization_config"), config_json.get(SAVED_CONFIG_KEY)):
        if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
            return qc
    return None


def _name_list(names: Any) -> Any:
    """``modules_to_not_convert`` as a list: a bare string is one module name (not its letters), None is empty;
    anything else is kept as given for :meth:`SparseScheduleConfig.post_init` to judge."""
    if names is None:
        return []
    if isinstance(names, str):
        return [names]
    if isinstance(names, (list, tuple, set, frozenset)):
        return list(names)
    return names


def _is_local_path(name: str) -> bool:
    """Whether a model/tokenizer name is a path on this machine rather than a hub id (``name`` or ``owner/name``)."""
    return (os.path.isabs(name) or os.path.exists(name) or name.startswith(("./", "../", "~")) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def describe_tokenizer(tokenizer: Any) -> str:
    """What config.json records of ``tokenizer``: a hub id as given, a local path by its folder name only
    (``"<local smollm2-135m>"``), an object by its ``name_or_path`` treated the same way (else its class name)."""
    name = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", None)
    if not isinstance(name, str) or not name:
        return type(tokenizer).__name__
    return f"<local {Path(name.rstrip('/')).name}>" if _is_local_path(name) else name


def describe_dataset(dataset: Any) -> str:
    """What config.json records of ``dataset``, never a local path: a hub name as given; a local ``.txt`` file as
    ``"<file NAME sha256:HEX>"`` and a folder as ``"<folder NAME: N .txt files sha256:HEX>"`` (HEX: SHA-256 of the
    files' names and bytes, so the data is identified without saying where it lives); a description saved earlier
    is kept; a path that no longer exists keeps its file name only; in-memory data is described by its size."""
    if isinstance(dataset, str):
        if dataset in HUB_DATASETS or (dataset.startswith("<") and dataset.endswith(">")):
            return dataset
        path = Path(dataset)
        if path.is_file():
            return f"<file {path.name} sha256:{_sha256_files([path], path.parent)}>"
        if path.is_dir():
            files = sorted(path.rglob("*.txt"))
            return f"<folder {path.resolve().name}: {len(files)} .txt files sha256:{_sha256_files(files, path)}>"
        return f"<file {path.name}>"
    if hasattr(dataset, "__len__"):
        return f"<{type(dataset).__name__} of {len(dataset)} texts>"
    return "<in-memory>"


def _sha256_files(files: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for f in files:
        if len(files) > 1 or f.parent != root:
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"SparseScheduleConfig: `{name}`={value!r} is not valid; allowed: {allowed}.")


def parse_memory_size(value: Any) -> int | None:
    """``max_device_memory`` -> bytes: ``None``, a positive int, or ``"<number><unit>"`` (``"2GiB"``, ``"1.5GB"``)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0:
            return value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in MEMORY_UNITS:
            size = int(float(match.group(1)) * MEMORY_UNITS[match.group(2).lower()])
            if size > 0:
                return size
    raise _bad("max_device_memory", value, MEMORY_FORMS)


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"N:M"`` -> ``(N, M)``: N zeros in every M consecutive input columns. ``None`` -> ``None``."""
    if pattern is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern)) if isinstance(pattern, str) else None
    if match is None:
        raise _bad("pattern", pattern, 'None or a string "N:M" with integers 0 < N < M, e.g. "2:4" or "4:8"')
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise _bad("pattern", pattern, 'None or a string "N:M" with integers 0 < N < M, e.g. "2:4" or "4:8"')
    return n, m


class SparseScheduleConfig(QuantizationConfigMixin):
    """Options of a SparseGPT compression run with a layer-wise sparsity schedule.

    Args:
        sparsity: target fraction of zeros over all compressed weights, parameter-weighted, ``0 <= s < 1``.
        schedule: (default ``"hessian"``, ``"uniform"`` with a ``pattern``) how the target is spread over layers: ``"hessian"`` (OBS loss curves from H⁻¹ scaled by each
            block's measured end-to-end damage, log-level clustering), ``"uniform"``, ``"owl"`` (outlier-weighted
            layer-wise sparsity) or ``"ramp"`` (linear in depth across ``sparsity_range``).
        sparsity_range: ``(lo, hi)`` with ``0 <= lo <= sparsity <= hi < 1``, or ``"auto"``: for ``"hessian"`` the
            span of the damage-minimising allocation of the measured curves; for ``"ramp"`` ``sparsity ± 0.1``.
        num_levels: number of log-error levels of the ``"hessian"`` schedule (1 = uniform).
        error_metric: ``"kl-alone"`` (end-to-end KL damage of each block pruned alone, default) or ``"obs"`` (the
            paper's local OBS loss, read literally: a baseline).
        probe_samples: calibration windows used to measure the schedule's statistics (dense pass).
        owl_m, owl_lambda: OWL's outlier threshold M and sparsity spread λ.
        preset: ``"default"`` (``solver="refit"``, no search, no reconstruction), ``"quality"`` (``solver="admm"``,
            an allocation search of 8 steps on the ``hessian`` schedule and 3 epochs of block reconstruction) or
            ``"sparsegpt"`` (the paper's solver alone): the values of ``solver``, ``search_steps`` and
            ``reconstruct_epochs`` not given explicitly.
        solver: the layer solver (default: the preset's): ``"sparsegpt"`` (the OBS scan of the paper), ``"refit"``
            (the scan's mask, its kept weights refitted exactly by conjugate gradients) or ``"admm"`` (the mask
            searched by ADMM with a growing penalty, as ALPS, then refitted). Per layer the refined result is kept
            only when its loss on the damped Hessian is below the scan's (see :mod:`.obs.admm`).
        search_steps: steps of the allocation search that refines the ``hessian`` schedule's per-block sparsities
            by the KL divergence of the pruned model from the dense one on the probe windows (see
            :mod:`.schedule.search`); 0 = no search; default: the preset's.
        true_sequential: as GPTQ's: the modules of a block are compressed one input group at a time in forward
            order (q/k/v, then o_proj, then gate/up, then down_proj), each group's Hessian collected from the
            inputs the compressed groups before it produce; ``False``: every Hessian of a block from its dense
            forward (SparseGPT's paper, the default: measured, the gain shrinks with the ``refit``/``admm`` solvers,
            to a wash at 0.5, for +9% (refit) to +29% (the scan) CPU time at 2:4; README, "Presets and layer
            solvers").
        reconstruct_epochs: epochs of block reconstruction after each block is compressed: Adam on the kept weights
            (mask fixed, so sparsity and N:M pattern are unchanged; with ``bits`` rounded back onto the grid at the
            end) so the compressed block's output on its inputs matches the dense model's output of that block; kept
            only when it lowers the block's error on the calibration windows (see :mod:`.pipeline.reconstruct`).
            0 = off; default: the preset's. Costs about ``3 x epochs + 3`` block forwards per window and block (a
            backward counts as two) and a second stream of hidden states (the dense model's) beside the calibration
            activations.
        reconstruct_lr: Adam's learning rate of the block reconstruction (cosine decay to 0).
        checkpoint_dir: folder where every finished block is saved; a run with the same options, data and model
            (weights included) resumes from the last finished block. Never written into config.json.
        max_device_memory: byte budget on the compute device (GPU) during compression: ``None`` (no cap), an int
            number of bytes or a string like ``"2GiB"``, ``"512MB"``, ``"1.5GB"``. Only the current decoder block and
            its OBS working set live on the device; the calibration activations join them if they fit in what
            remains, else they stay in (pinned) CPU memory and move one window at a time. A block whose working
            set alone exceeds the budget is refused before any work (see :mod:`.residency` for the accounting).
        pattern: ``None`` (unstructured) or ``"N:M"``: N zeros in every M consecutive inputs of each output row.
            Requires ``sparsity == N/M``.
        bits: ``None`` (no quantization), 4 or 8: GPTQ quantization of the kept weights inside the same OBS pass.
        group_size: quantization group length along the input dimension, ``-1`` = one grid per output row.
        sym: symmetric grid (zero point in the middle) instead of an asymmetric min/max grid.
        dataset: calibration text: a path (``str`` or ``pathlib.Path``) to a UTF-8 ``.txt`` file or a folder of
            them, a list of strings, a ``datasets.Dataset`` with a ``"text"`` column, or a hub name
            (``"wikitext2"``, ``"c4"``, needs network). config.json records a local file by its name and SHA-256.
        tokenizer: tokenizer object or name/path; ``None`` uses the model's own path. Its token ids must fit the
            model's input embeddings.
        num_samples, seq_len, seed: ``num_samples`` (at most 65536) random windows of ``seq_len`` tokens, drawn with
            ``seed`` (-2**63 <= seed < 2**64, torch.Generator's range).
        damp: Hessian damping, ``damp * mean(diag H)`` added to the diagonal (escalated on a failed Cholesky);
            ``0 < damp <= 1``.
        block_size: OBS column block width (lazy batch updates, adaptive mask selection per block).
        modules_to_not_convert: module names (or name suffixes) left untouched, a list or one name; ``lm_head`` by
            default.
        export_format: how ``save_pretrained`` stores the compressed weights: ``"compact"`` (default; bitmask of
            the nonzeros plus their values, or their packed ``bits``-bit codes and grid, decompressed on load —
            needs ``import optimum_sparsesched``), ``"dense"`` (plain weights with zeros) or
            ``"compressed-tensors"`` (the compressed-tensors ``pack-quantized`` layout, requires ``bits``; loads in
            plain transformers with the ``compressed-tensors`` package and in vLLM without this plugin).
        results: what a run achieved (:class:`.results.CompressionResults`, or its dict as saved); empty before.
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        schedule: str | None = None,
        pattern: str | None = None,
        bits: int | None = None,
        group_size: int = 128,
        sym: bool = False,
        dataset: Any = "wikitext2",
        tokenizer: Any = None,
        num_samples: int = 128,
        seq_len: int = 2048,
        seed: int = 0,
        damp: float = 0.01,
        block_size: int = 128,
        modules_to_not_convert: Sequence[str] | None = ("lm_head",),
        sparsity_range: Any = "auto",
        num_levels: int = 5,
        error_metric: str = "kl-alone",
        probe_samples: int = 4,
        checkpoint_dir: str | None = None,
        max_device_memory: int | str | None = None,
        export_format: str = "compact",
        owl_m: float = 5.0,
        owl_lambda: float = 0.08,
        preset: str = "default",
        solver: str | None = None,
        search_steps: int | None = None,
        true_sequential: bool = False,
        reconstruct_epochs: int | None = None,
        reconstruct_lr: float = 1e-3,
        results: CompressionResults | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.sparsity = sparsity
        self.schedule = schedule
        self.pattern = pattern
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.dataset = os.fspath(dataset) if isinstance(dataset, os.PathLike) else dataset
        self.tokenizer = os.fspath(tokenizer) if isinstance(tokenizer, os.PathLike) else tokenizer
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.seed = seed
        self.damp = damp
        self.block_size = block_size
        self.modules_to_not_convert = _name_list(modules_to_not_convert)
        self.sparsity_range = list(sparsity_range) if isinstance(sparsity_range, (list, tuple)) else sparsity_range
        self.num_levels = num_levels
        self.error_metric = error_metric
        self.probe_samples = probe_samples
        self.checkpoint_dir = str(checkpoint_dir) if isinstance(checkpoint_dir, os.PathLike) else checkpoint_dir
        self.max_device_memory = max_device_memory
        self.export_format = export_format
        self.owl_m = owl_m
        self.owl_lambda = owl_lambda
        self.preset = preset
        self.solver = solver
        self.search_steps = search_steps
        self.true_sequential = true_sequential
        self.reconstruct_epochs = reconstruct_epochs
        self.reconstruct_lr = reconstruct_lr
        self.results = results if isinstance(results, CompressionResults) else CompressionResults.from_dict(results)
        kwargs.pop("quant_method", None)
        if kwargs:
            raise TypeError(f"SparseScheduleConfig got unknown options: {sorted(kwargs)}")
        self.post_init()

    # ------------------------------------------------------------------ validation
    def post_init(self) -> None:
        """Check every option; raise a ValueError naming the option, its value and what is allowed."""
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0 <= s < 1:
            raise _bad("sparsity", s, "a finite number with 0 <= sparsity < 1")
        self.sparsity = float(s)
        if self.schedule is None:  # default: the Hessian schedule; N:M patterns are uniform by construction
            self.schedule = "uniform" if self.pattern is not None else "hessian"
        if self.schedule not in SCHEDULES:
            raise _bad("schedule", self.schedule, " | ".join(repr(x) for x in SCHEDULES))
        if self.error_metric not in ERROR_METRICS:
            raise _bad("error_metric", self.error_metric, " | ".join(repr(x) for x in ERROR_METRICS))
        self._check_preset()
        self._check_range()
        for name in ("num_levels", "probe_samples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise _bad(name, v, "a positive integer")
        for name, low in (("owl_m", 0.0), ("owl_lambda", 0.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= low:
                raise _bad(name, v, "a finite number > 0")
        nm = parse_pattern(self.pattern)
        if nm is not None:
            self.pattern = f"{nm[0]}:{nm[1]}"
            if self.schedule != "uniform":
                raise _bad("schedule", self.schedule, f"'uniform' when pattern={self.pattern!r} (every row of every "
                           "module then has exactly N/M zeros)")
            if abs(self.sparsity - nm[0] / nm[1]) > 1e-9:
                raise _bad("sparsity", self.sparsity, f"{nm[0] / nm[1]} (= N/M) when pattern={self.pattern!r}")
        if self.bits not in SUPPORTED_BITS or isinstance(self.bits, bool):
            raise _bad("bits", self.bits, "None, 4 or 8")
        if self.export_format not in EXPORT_FORMATS:
            raise _bad("export_format", self.export_format, " | ".join(repr(x) for x in EXPORT_FORMATS))
        if self.export_format == "compressed-tensors" and self.bits is None:
            raise _bad("export_format", self.export_format, "'compact' or 'dense' when bits=None "
                       "('compressed-tensors' stores the INT4/INT8 pack-quantized layout, so it needs bits=4 or 8)")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or not (
            self.group_size == -1 or self.group_size > 0
        ):
            raise _bad("group_size", self.group_size, "a positive integer or -1 (one grid per output channel)")
        for name in ("sym", "true_sequential"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, getattr(self, name), "True or False")
        for name in ("num_samples", "seq_len", "block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise _bad(name, v, "a positive integer")
        if self.num_samples > MAX_NUM_SAMPLES:
            raise _bad("num_samples", self.num_samples, f"at most {MAX_NUM_SAMPLES}: every calibration window's "
                       "activations are kept in memory while the blocks are compressed (num_samples x seq_len x "
                       "hidden_size values; 65536 windows of 2048 tokens at hidden size 4096 are 1 TiB in bf16), and "
                       "SparseGPT's 128 windows already give its published results")
        lo, hi = SEED_RANGE
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not lo <= self.seed <= hi:
            raise _bad("seed", self.seed, "an integer from -2**63 to 2**64 - 1 (what torch.Generator.manual_seed "
                       "accepts)")
        d = self.damp
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or not 0 < d <= MAX_DAMP:
            raise _bad("damp", d, f"a number with 0 < damp <= {MAX_DAMP:g}: the fraction of the mean Hessian diagonal "
                       "added to the diagonal (SparseGPT and GPTQ use 0.01); above 1 the damping outweighs the "
                       "measured curvature, so OBS turns into magnitude pruning, and its x10 escalations on a failed "
                       "Cholesky overflow float32")
        self.damp = float(d)
        names = self.modules_to_not_convert
        if not isinstance(names, list) or not all(isinstance(m, str) and m for m in names):
            raise _bad("modules_to_not_convert", names, "None, a module name, or a list of non-empty module names")
        self._check_dataset()
        cd = self.checkpoint_dir
        if cd is not None and (not isinstance(cd, str) or not cd or os.path.isfile(cd)):
            raise _bad("checkpoint_dir", cd, "None or a folder path (created if missing; an existing run there is "
                       "resumed)")
        parse_memory_size(self.max_device_memory)
        tok = self.tokenizer
        if not (tok is None or (bool(tok.strip()) if isinstance(tok, str) else callable(tok))):
            raise _bad("tokenizer", tok if isinstance(tok, (str, int, float)) else type(tok).__name__,
                       "None (the model's own), a tokenizer object (callable on text), or a model name/path")

    def _check_preset(self) -> None:
        if self.preset not in PRESETS:
            raise _bad("preset", self.preset, " | ".join(repr(x) for x in PRESETS))
        chosen = PRESETS[self.preset]
        if self.solver is None:
            self.solver = chosen["solver"]
        if self.solver not in SOLVERS:
            raise _bad("solver", self.solver, " | ".join(repr(x) for x in SOLVERS))
        steps = self.search_steps
        if steps is None:
            self.search_steps = chosen["search_steps"] if self.schedule == "hessian" and self.sparsity > 0 else 0
        elif isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_SEARCH_STEPS:
            raise _bad("search_steps", steps, f"an integer from 0 (no search) to {MAX_SEARCH_STEPS}")
        elif steps and self.schedule != "hessian":
            raise _bad("search_steps", steps, f"0 with schedule={self.schedule!r} (the search refines the 'hessian' "
                       "schedule's allocation)")
        epochs = self.reconstruct_epochs
        if epochs is None:
            self.reconstruct_epochs = chosen["reconstruct_epochs"]
        elif isinstance(epochs, bool) or not isinstance(epochs, int) or not 0 <= epochs <= MAX_RECONSTRUCT_EPOCHS:
            raise _bad("reconstruct_epochs", epochs, f"an integer from 0 (off) to {MAX_RECONSTRUCT_EPOCHS}")
        lr = self.reconstruct_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or not 0 < lr <= 1:
            raise _bad("reconstruct_lr", lr, "a number with 0 < reconstruct_lr <= 1 (Adam's learning rate; 1e-3 by "
                       "default)")
        self.reconstruct_lr = float(lr)

    def _check_range(self) -> None:
        r = self.sparsity_range
        if r == "auto":
            return
        allowed = f'"auto" or (lo, hi) with 0 <= lo <= sparsity={self.sparsity} <= hi < 1'
        if not isinstance(r, (list, tuple)) or len(r) != 2 or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in r
        ):
            raise _bad("sparsity_range", r, allowed)
        lo, hi = float(r[0]), float(r[1])
        if not (0 <= lo <= hi < 1) or not (lo - 1e-9 <= self.sparsity <= hi + 1e-9):
            raise _bad("sparsity_range", r, allowed)
        self.sparsity_range = [lo, hi]

    def _check_dataset(self) -> None:
        ds = self.dataset
        if isinstance(ds, str):
            if ds in HUB_DATASETS or os.path.exists(ds):
                return
            raise _bad("dataset", ds, f"a path (str or pathlib.Path) to an existing .txt file or folder, one of {HUB_DATASETS}, "
                       "a list of strings, or a datasets.Dataset with a 'text' column")
        if isinstance(ds, (list, tuple)):
            if not ds or not all(isinstance(t, str) for t in ds):
                raise _bad("dataset", f"<list of {len(ds)} items>", "a non-empty list of strings")
            return
        column_names = getattr(ds, "column_names", None)
        if column_names is not None:
            if "text" not in column_names:
                raise _bad("dataset", f"<Dataset with columns {column_names}>", "a datasets.Dataset with a 'text' column")
            return
        raise _bad("dataset", type(ds).__name__, "str path, hub name, list[str] or datasets.Dataset")

    # ------------------------------------------------------------------ derived
    @property
    def max_device_memory_bytes(self) -> int | None:
        """``max_device_memory`` in bytes (``None``: no cap)."""
        return parse_memory_size(self.max_device_memory)

    @property
    def nm(self) -> tuple[int, int] | None:
        """The N:M pattern as integers, or None for unstructured sparsity."""
        return parse_pattern(self.pattern)

    # ------------------------------------------------------------------ serialization
    def options_dict(self) -> dict[str, Any]:
        """Every option, JSON-safe and free of local paths (this dict is what config.json, the model card and an
        upload hold): objects (tokenizer, in-memory datasets) are replaced by descriptions, a local calibration file
        or folder by its name and the SHA-256 of its text (:func:`describe_dataset`), a local tokenizer path by its
        folder name, and :data:`LOCAL_OPTIONS` (``checkpoint_dir``) are left out."""
        out: dict[str, Any] = {}
        for key, value in list(self.__dict__.items()):
            if key.startswith("_") or key == "results" or key in LOCAL_OPTIONS:
                continue
            if key == "tokenizer" and value is not None:
                value = describe_tokenizer(value)
            elif key == "dataset":
                value = self._dataset_description()
            out[key] = value
        return out

    def _dataset_description(self) -> str:
        """:func:`describe_dataset` of ``dataset``, computed once per dataset (a local file is hashed once)."""
        cached = getattr(self, "_described", None)
        key = self.dataset if isinstance(self.dataset, str) else id(self.dataset)
        if cached is None or cached[0] != key:
            self._described = (key, describe_dataset(self.dataset))
        return self._described[1]

    def fingerprint_options(self) -> dict[str, Any]:
        """The options that decide the compressed weights (all but :data:`OUTPUT_NEUTRAL_OPTIONS`)."""
        return {k: v for k, v in self.options_dict().items() if k not in OUTPUT_NEUTRAL_OPTIONS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict for config.json: the options, and the results under ``"results"``."""
        return {**self.options_dict(), "results": self.results.to_dict()}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """Rebuild from config.json. A saved in-memory dataset description is not a dataset: keep it for the
        record but do not validate it (a reloaded checkpoint never calibrates again). Configs saved by
        optimum-sparsesched 0.1.0 (results at the top level, retired options) load too."""
        config_dict = dict(config_dict)
        results = dict(config_dict.pop("results", None) or {})
        for key in RESULT_FIELDS:
            if key in config_dict:
                results.setdefault(key, config_dict.pop(key))
        for key in RETIRED_OPTIONS:
            config_dict.pop(key, None)
        if config_dict.get("error_metric") == "kl":  # retired: its checkpoints keep a valid record
            config_dict["error_metric"] = "kl-alone"
        if "preset" not in config_dict:  # saved before presets existed: those runs used the SparseGPT scan
            config_dict["preset"] = "sparsegpt"
        config_dict.setdefault("true_sequential", False)  # saved before the option: blocks were solved at once
        config_dict.setdefault("reconstruct_epochs", 0)  # saved before the option: no block reconstruction
        dataset = config_dict.get("dataset")
        if isinstance(dataset, str) and dataset not in HUB_DATASETS and not os.path.exists(dataset):
            config_dict["dataset"] = "wikitext2"  # a description ("<list of N texts>") or a path gone since
        config = cls(**{k: v for k, v in config_dict.items() if k in cls._fields() or k == "quant_method"},
                     results=results)
        if dataset is not None:
            config.dataset = dataset
        for key, value in list(kwargs.items()):
            if hasattr(config, key):
                setattr(config, key, value)
                kwargs.pop(key)
        return (config, kwargs) if return_unused_kwargs else config

    @staticmethod
    def _fields() -> set[str]:
        import inspect

        return set(inspect.signature(SparseScheduleConfig.__init__).parameters) - {"self", "kwargs", "results"}
