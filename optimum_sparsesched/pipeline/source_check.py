"""The one check of a source model before any work: it is a causal decoder LM this package can walk, every tensor
it needs was read from its checkpoint, and every weight is finite.

Every entry point runs it before calibration — ``from_pretrained(..., quantization_config=cfg)`` (the quantizer's
load hooks), :func:`optimum_sparsesched.compress`, :func:`optimum_sparsesched.compress_checkpoint` and the command
line — and each fault is one ``ValueError`` naming what is wrong (the CLI prints it as ``error: ...``, exit 2):

- :func:`check_causal_lm_config` / :func:`check_causal_lm_model`: a decoder-only causal language model, built with
  its own head. An encoder-decoder (T5, BART) is refused, and so is a checkpoint of a model without a language
  modelling head (``BertModel``, ``LlamaModel``, a classifier): ``AutoModelForCausalLM`` would build a head around
  it with random weights, which would then be compressed and saved as if they were the user's.
- :func:`check_all_loaded`: a parameter the checkpoint lacks is initialised at random by transformers (its load
  report says MISSING, and the load goes on). transformers marks every tensor it read from the checkpoint
  (``_is_hf_initialized``) so that its initialisation skips them; a resident parameter of a loaded model without
  that mark was not read. An offloaded parameter (``meta``, with an accelerate hook) was not read when its weights
  map has no entry for it. A model built from a config (no tensor read at all) has nothing to check.
- :func:`check_finite`: a NaN/Inf in any floating parameter — resident, or offloaded (read from its weights map
  one tensor at a time) — named with its count; it would otherwise fail deep inside the OBS solve without a
  module's name, or (in the head) turn the schedule's damage measurement into NaN.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import nn

from .offload import offloaded_tensors

SUPPORTED = ("decoder-only causal language models that AutoModelForCausalLM builds with their own head (e.g. "
             "LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, Gemma3ForCausalLM, OPTForCausalLM, "
             "GPT2LMHeadModel)")
CHUNK = 1 << 24  # elements per counting call: its bool temporaries stay small whatever the tensor


@functools.lru_cache(maxsize=1)
def causal_lm_classes() -> frozenset[str]:
    """The class names ``AutoModelForCausalLM`` builds (transformers' causal-LM mapping)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update(value if isinstance(value, (list, tuple)) else [value])
    return frozenset(names)


def is_causal_lm_class(name: str) -> bool:
    """Whether a model class name is a causal LM with its head (transformers' mapping, or the naming of remote-code
    causal LMs)."""
    return name in causal_lm_classes() or name.endswith(("ForCausalLM", "LMHeadModel"))


def check_causal_lm_config(config: Any) -> None:
    """Refuse a config (a ``PretrainedConfig``) that is not a decoder-only causal LM, or whose ``architectures``
    name a model without a language-modelling head."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind = type(config).__name__
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model: a {kind} (model_type {model_type!r}) is an encoder-decoder model; supported: "
                         f"{SUPPORTED}")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not _remote_causal_lm(config):
        raise ValueError(f"model: a {kind} (model_type {model_type!r}) is not a causal language model "
                         f"AutoModelForCausalLM can build; supported: {SUPPORTED}")
    _check_architectures(config, None)


def _remote_causal_lm(config: Any) -> bool:
    auto_map = getattr(config, "auto_map", None) or {}
    return isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map


def _check_architectures(config: Any, built: str | None) -> None:
    saved = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    if saved and not any(is_causal_lm_class(a) for a in saved):
        around = f" (here {built})" if built else ""
        raise ValueError(f"model: the checkpoint holds a {saved[0]} (config.json architectures), not a causal language "
                         f"model with its head: AutoModelForCausalLM would build a causal LM around it{around} with "
                         f"a randomly initialised head, and that head would be compressed and saved as yours; "
                         f"supported: {SUPPORTED}")


def check_causal_lm_model(model: nn.Module) -> None:
    """Refuse a model object that is not a causal LM with its head (see :func:`check_causal_lm_config`)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"model: a {name} is not a transformers model (it has no config); supported: {SUPPORTED}")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model: {name} is an encoder-decoder model; supported: {SUPPORTED}")
    if not is_causal_lm_class(name):
        raise ValueError(f"model: {name} is not a causal language model with its head; supported: {SUPPORTED}")
    _check_architectures(config, name)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def tensors_not_loaded(model: nn.Module) -> list[str]:
    """The parameters of a model loaded by ``from_pretrained`` that were not read from its checkpoint (see the
    module docstring); ``[]`` for a model that read no tensor at all (built from a config)."""
    entries = offloaded_tensors(model)
    named = list(model.named_parameters())
    if not any(getattr(p, "_is_hf_initialized", False) for _, p in named if p.device.type != "meta"):
        return []  # nothing was read from a checkpoint: nothing can be missing from it
    ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]
    missing = []
    for name, p in named:
        if any(r.search(name) for r in ignored):
            continue
        if p.device.type != "meta":
            if not getattr(p, "_is_hf_initialized", False):
                missing.append(name)
            continue
        entry = entries.get((id(_owner(model, name)[0]), _owner(model, name)[1]))
        if entry is None:
            continue  # no hook holds it: refused later by the offload check, with its own message
        store, key = entry.store()
        keys = getattr(store, "all_keys", None)  # accelerate's loader: membership without reading the tensor
        if key not in (keys if keys is not None else store):
            missing.append(name)
    return missing


def check_all_loaded(model: nn.Module) -> None:
    """Refuse a model some of whose parameters transformers initialised at random because its checkpoint lacks
    them (:func:`tensors_not_loaded`)."""
    missing = tensors_not_loaded(model)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        source = getattr(model, "name_or_path", "") or "its checkpoint"
        many = len(missing) != 1
        raise ValueError(f"model: {len(missing)} parameter{'s' * many} of {type(model).__name__} "
                         f"{'are' if many else 'is'} not in {source!s} ({shown}): transformers filled "
                         f"{'them' if many else 'it'} with random values when it loaded the model, and compressing "
                         "that would save random weights as yours; the checkpoint is incomplete (a missing or cut "
                         "shard) or of another architecture: load a complete checkpoint")


def _non_finite(tensor: torch.Tensor) -> tuple[int, int]:
    """``(NaN count, ±Inf count)`` of a floating tensor, in chunks. Fast path: any NaN or Inf makes a chunk's sum
    non-finite, so a finite sum (one vectorised read, no temporary) clears the chunk; only a chunk whose sum is not
    finite (a fault, or finite values summing past the dtype's range) is counted exactly."""
    flat = tensor.detach().reshape(-1)
    if all(bool(torch.isfinite(c.sum())) for c in flat.split(CHUNK)):
        return 0, 0
    return (sum(int(torch.isnan(c).sum()) for c in flat.split(CHUNK)),
            sum(int(torch.isinf(c).sum()) for c in flat.split(CHUNK)))


def check_finite(model: nn.Module) -> None:
    """Refuse a model any of whose floating parameters holds NaN or Inf, naming the first such tensor (offloaded
    ones are read from their weights maps one at a time)."""
    entries = offloaded_tensors(model)
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        value = p
        if p.device.type == "meta":
            entry = entries.get((id(_owner(model, name)[0]), _owner(model, name)[1]))
            if entry is None:
                continue
            value = entry.hook.weights_map[entry.name]
        nan, inf = _non_finite(value)
        if nan or inf:
            raise ValueError(f"model: the source weight {name} holds {nan} NaN and {inf} Inf values (of "
                             f"{value.numel()}); its checkpoint is damaged or was saved after an overflow, and no "
                             "compression of it can be right: restore the original weights")


def check_source(model: nn.Module) -> None:
    """The whole check of a model object before any compression work (the module docstring)."""
    check_causal_lm_model(model)
    check_all_loaded(model)
    check_finite(model)
