"""The command line's inputs, checked before any long work: options -> a :class:`.config.SparseScheduleConfig`,
text files (UTF-8, not empty), the output folder, lm-eval tasks, and the model itself (a folder, a hub id, or the
embedded default). A bad one raises :class:`UsageError`, which the CLI prints as one line and exits 2 on."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .checks import UsageError, check_loaded_source, check_source_folder, check_tokenizer_source, looks_like_path

#: defaults of the embedded run (no MODEL), chosen so that the README's first command ends in minutes on 2 CPU cores
EMBEDDED = {"num_samples": 16, "seq_len": 512, "probe_samples": 2, "eval_windows": 2}
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class LoadedModel:
    """A model ready to compress or evaluate, its tokenizer, and where its weights came from (in words)."""

    model: Any
    tokenizer: Any
    source: str
    seconds: float = 0.0


def config_from_args(a: Any) -> Any:
    """The compression options of ``compress`` -> ``SparseScheduleConfig`` (the embedded run's defaults when no
    MODEL is given)."""
    from ..config import SparseScheduleConfig
    from .default_model import CALIBRATION_TEXT

    embedded = a.model is None
    defaults = SparseScheduleConfig()

    def pick(name: str) -> Any:
        value = getattr(a, name)
        return value if value is not None else EMBEDDED[name] if embedded else getattr(defaults, name)

    rng = a.sparsity_range
    if rng != "auto":
        try:
            rng = [float(x) for x in str(rng).split(",")]
        except ValueError:
            raise UsageError(f"--sparsity-range: {a.sparsity_range!r} is not valid; allowed: auto or LO,HI "
                             "(e.g. 0.4,0.8)") from None
    options = dict(sparsity=a.sparsity, schedule=a.schedule, pattern=a.pattern, bits=a.bits,
                   group_size=a.group_size, sym=a.sym, damp=a.damp, block_size=a.block_size,
                   error_metric=a.error_metric, probe_samples=pick("probe_samples"), sparsity_range=rng,
                   num_levels=a.num_levels, owl_m=a.owl_m, owl_lambda=a.owl_lambda, preset=a.preset,
                   solver=a.solver, search_steps=a.search_steps,
                   reconstruct_epochs=a.reconstruct_epochs, reconstruct_lr=a.reconstruct_lr,
                   reconstruct_target=a.reconstruct_target,
                   dataset=a.dataset or (str(CALIBRATION_TEXT) if embedded else "wikitext2"),
                   num_samples=pick("num_samples"), seq_len=pick("seq_len"), seed=a.seed,
                   export_format=a.export_format, checkpoint_dir=a.checkpoint_dir,
                   max_device_memory=a.max_device_memory)
    if a.modules_to_not_convert is not None:
        options["modules_to_not_convert"] = a.modules_to_not_convert
    if a.tokenizer is not None:
        options["tokenizer"] = a.tokenizer
    try:
        return SparseScheduleConfig(**options)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def check_eval_text(path: str, option: str) -> str:
    """``path`` is a readable, non-empty UTF-8 text file; returns it."""
    from ..pipeline.calibration import check_text_file

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{option}: {path!r} is not a file; allowed: a UTF-8 text file")
    try:
        chars = check_text_file(p, option)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not chars:
        raise UsageError(f"{option}: {p.name!r} holds no text")
    return path


def check_text_source(dataset: Any, option: str) -> None:
    """A calibration ``dataset`` that names local files: every ``.txt`` file is UTF-8 and one holds text; a hub name
    (``wikitext2``, ``c4``): it loads now, before the model (the Hub may be out of reach)."""
    from ..pipeline.calibration import CalibrationSource

    try:
        CalibrationSource(dataset).check_readable(option)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def check_output_folder(out: str | None, output: str | None, model: str | None,
                        overwrite: bool = False) -> Path | None:
    """The folder to save into (None: nothing is saved): not a file, creatable, and, unless ``overwrite``, neither
    the model's own folder nor a folder holding a model this package did not write (the rule of every save,
    :func:`.publish.staging.check_overwrite`)."""
    from ..publish.staging import check_overwrite

    if out is not None and output is not None and Path(out) != Path(output):
        raise UsageError(f"OUT: given twice ({out!r} and -o {output!r}); give one")
    target = out if out is not None else output
    if target is None:
        return None
    path = Path(target).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"OUT: {target!r} is a file; allowed: a folder (created if missing)")
    try:
        check_overwrite(path, overwrite, source=model if model is not None else None, what="OUT")
    except ValueError as exc:
        raise UsageError(str(exc).replace("overwrite=True", "--overwrite")) from None
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"OUT: {target!r} cannot be created or written ({str(existing)!r} is not writable)")
    return path


def parse_tasks(tasks: str | None, task_paths: list[str]) -> list[str]:
    """``--tasks a,b`` -> ``["a", "b"]``, with lm-eval installed and every ``--task-path`` present."""
    if tasks is None:
        if task_paths:
            raise UsageError("--task-path: given without --tasks; name the tasks to run with --tasks")
        return []
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UsageError(f"--tasks: {tasks!r} names no task; allowed: comma-separated lm-eval tasks, e.g. "
                         "hellaswag,arc_easy")
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UsageError("--tasks needs lm-evaluation-harness: pip install 'optimum-sparsesched[eval]'")
    for p in task_paths:
        if not os.path.exists(p):
            raise UsageError(f"--task-path: {p!r} does not exist")
    return names


def check_model_ref(ref: str | None, tokenizer: str | None = None) -> None:
    """``ref`` names a model folder (with ``config.json``, of a causal LM, its weight files whole, and a tokenizer
    unless ``tokenizer`` names one) or a hub model whose config loads (a small download, or huggingface_hub's
    cache); None (the embedded default) is always fine."""
    if ref is None:
        return
    hint = f" (to save the embedded default model into a folder, use: compress -o {ref})"
    path = Path(ref).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"model: {ref!r} is a folder without config.json, not a model{hint}")
    if path.exists() and not path.is_dir():
        raise UsageError(f"model: {ref!r} is a file; allowed: a model folder or a hub id")
    if path.exists():
        check_source_folder(path)
        check_tokenizer_source(ref, tokenizer)
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from transformers import AutoConfig

    from ..pipeline.source_check import check_causal_lm_config

    if looks_like_path(ref):
        raise UsageError(f"model: no such folder {ref!r}")
    try:
        validate_repo_id(ref)
    except HFValidationError:
        raise UsageError(f"model: {ref!r} is neither a folder nor a valid hub id ('name' or 'owner/name')") from None
    try:
        config = AutoConfig.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UsageError(f"model: {ref!r} is not a local folder and could not be loaded from the Hugging Face Hub: "
                         f"{reason[:200]}{hint}") from None
    try:
        check_causal_lm_config(config)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_compressed_by_us(ref: str) -> None:
    """``--run-compressed`` needs a checkpoint in this package's compact format: its config's
    ``quantization_config.quant_method`` is :data:`.config.QUANT_METHOD` (a compressed-tensors export keeps this
    package's options under another key, which :func:`.config.saved_config_dict` accepts, but loads through
    compressed-tensors)."""
    from transformers import AutoConfig

    from ..config import QUANT_METHOD

    try:
        config = AutoConfig.from_pretrained(ref)
    except (OSError, ValueError):
        return  # the load that follows names the problem
    quantization = getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method != QUANT_METHOD:
        hint = (" (a compressed-tensors export: plain transformers keeps it compressed with "
                "CompressedTensorsConfig(run_compressed=True))" if method == "compressed-tensors" else "")
        raise UsageError(f"--run-compressed: {ref!r} is not a checkpoint in this package's compact format (its "
                         f"config's quantization_config.quant_method is {method!r}, not {QUANT_METHOD!r}){hint}; "
                         "allowed: a compact checkpoint this package saved, or no --run-compressed")


def load_model(ref: str | None, dtype: str, say: Callable[[str], None], tokenizer: str | None = None,
               source: bool = False, run_compressed: bool | str = False) -> LoadedModel:
    """``ref`` (a model folder or hub id; None: the embedded default) loaded in ``dtype`` (``"auto"``: the one it
    was saved in; float32 for the embedded model) with its tokenizer (``tokenizer``: another folder or hub id to read
    it from); with ``source``, checked as the source of a compression (:func:`.pipeline.source_check.check_source`);
    with ``run_compressed`` (``"compact"``, ``"int4"``, ``"sparse"``), a checkpoint this package compressed keeps its compressed
    Linears compressed in memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    if run_compressed and ref is None:
        raise UsageError("--run-compressed: the embedded model is not compressed; pass a checkpoint this package saved")
    if ref is None:
        from .default_model import load_default_model

        say("loading the embedded default model (SmolLM2-135M)")
        default = load_default_model(torch.float32 if dtype == "auto" else torch_dtype, say=say)
        say(f"weights: {default.source}")
        return LoadedModel(default.model, default.tokenizer, default.source)
    check_model_ref(ref, tokenizer)
    path = Path(ref).expanduser()
    extra: dict[str, Any] = {}
    if run_compressed:  # a loading option of checkpoints this package compressed
        from ..config import SparseScheduleConfig

        _check_compressed_by_us(ref)
        extra["quantization_config"] = SparseScheduleConfig(run_compressed=run_compressed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer or ref)
        with warnings.catch_warnings():  # transformers' note that only the loading attributes of ours are merged
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch_dtype, **extra)
    except (OSError, ValueError) as exc:
        where = "the folder" if path.exists() else "the Hugging Face Hub"
        reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UsageError(f"model: {ref!r} could not be loaded from {where}: {reason[:200]}") from None
    if not path.exists() and not getattr(model.config, "weights_source", None):
        model.config.weights_source = f"{ref} from the Hugging Face Hub"
    if source:
        check_loaded_source(model)
    where = getattr(model.config, "weights_source", None) or f"the local folder {path.name}"
    return LoadedModel(model.eval(), tokenizer, where)
