"""A source checkpoint's files, checked before anything is loaded from them: ``config.json``, the weight index and
the header of every safetensors file against the file's size.

A safetensors file is 8 bytes (little-endian header length ``N``), ``N`` bytes of JSON header — per tensor its
``dtype``, ``shape`` and ``data_offsets`` ``[begin, end)`` into the data that follows — then the data. Only the
headers are read here (no tensor data), so the check costs a few reads per file whatever the model's size. Each
fault is one ``ValueError`` naming the file (and the tensor), raised before any model is built:

- ``config.json`` missing, not JSON, not an object, or refused by transformers' ``AutoConfig``;
- ``model.safetensors.index.json`` not JSON, without a ``weight_map``, naming a file that is not in the folder (a
  missing shard), or listing a tensor that its file does not hold;
- a weight file that is empty, shorter than its header says, or whose tensors end past the end of the file (a cut
  download or an interrupted copy), or whose tensor sizes disagree with their dtype and shape.

- a tensor whose shape is not the one ``config.json`` describes for the tensor of that name
  (:func:`check_shapes`, against a weightless ``meta`` skeleton of the model): ``config.json`` and the weights do
  not belong together (transformers would stop the load with its own error, or, streamed, the run after its first
  block).

What the model needs but the checkpoint lacks is found when the model is built from it
(:func:`.source_check.check_all_loaded`): that depends on the architecture's key names, which transformers knows.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: bytes per element of safetensors' dtypes (a dtype not listed is not size-checked)
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
MAX_HEADER = 100_000_000  # safetensors' own limit on the header
#: the files transformers' tokenizers are saved as (any one of them makes a folder hold a tokenizer)
TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "vocab.json", "vocab.txt", "merges.txt", "*.model", "*.spm", "*.tiktoken", "chat_template.jinja",
                      "chat_template.json")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it."""

    file: str
    dtype: str
    shape: tuple[int, ...]


def _fault(path: Path, what: str) -> ValueError:
    return ValueError(f"model: the checkpoint file {path.name} {what}; the checkpoint is damaged (an interrupted "
                      "download, copy or save): download or copy it again")


def read_header(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """The tensors of the safetensors file ``path`` (name -> :class:`TensorEntry`), after checking its header
    against the file's size; ValueError naming the file and the fault."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = f.read(length) if 0 < length <= min(MAX_HEADER, size - 8) else b""
    except OSError as exc:
        raise ValueError(f"model: the checkpoint file {path.name} cannot be read ({exc.strerror})") from None
    if size == 0:
        raise _fault(path, "is empty (0 bytes)")
    if length < 2 or length > MAX_HEADER or length > size - 8:
        raise _fault(path, f"is not a complete safetensors file (its {size} bytes cannot hold the header it announces)")
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _fault(path, "has a header that is not valid JSON") from None
    if not isinstance(header, dict):
        raise _fault(path, "has a header that is not a JSON object")
    data = size - 8 - length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = str(info["dtype"]), tuple(int(d) for d in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise _fault(path, f"describes tensor {name} without a valid dtype, shape and data_offsets") from None
        if not 0 <= begin <= end or end > data:
            raise _fault(path, f"is truncated: tensor {name} ends at byte {end} of the data, which has {data} bytes")
        if dtype in DTYPE_BYTES and end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise _fault(path, f"describes tensor {name} ({dtype} {list(shape)}) with {end - begin} bytes of data")
        tensors[name] = TensorEntry(path.name, dtype, shape)
    return tensors


def weight_files(folder: str | os.PathLike) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of the checkpoint in ``folder`` and its index's ``weight_map`` (None without an index):
    the files the index names (each must exist), else ``model.safetensors``, else none."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            raise ValueError(f"model: the checkpoint's {INDEX_FILE} is not a valid JSON index (damaged or cut); "
                             "download or copy it again") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"model: the checkpoint's {INDEX_FILE} has no weight_map of tensor names to files")
        names = sorted(set(weight_map.values()))
        absent = [n for n in names if not (folder / n).is_file()]
        if absent:
            raise ValueError(f"model: the checkpoint's {INDEX_FILE} names {', '.join(absent)}, which "
                             f"{'is' if len(absent) == 1 else 'are'} not in the folder (a missing shard); download or "
                             "copy the whole checkpoint again")
        return [folder / n for n in names], weight_map
    return ([folder / SINGLE_FILE] if (folder / SINGLE_FILE).is_file() else []), None


def check_weight_files(files: Iterable[str | os.PathLike],
                       weight_map: dict[str, str] | None = None) -> dict[str, TensorEntry]:
    """Every tensor of the safetensors ``files`` (their headers checked, :func:`read_header`); with the index's
    ``weight_map``, each tensor it lists must be in the file it names."""
    tensors: dict[str, TensorEntry] = {}
    for path in files:
        tensors.update(read_header(path))
    for name, file in (weight_map or {}).items():
        entry = tensors.get(name)
        if entry is None or entry.file != Path(file).name:
            raise ValueError(f"model: the checkpoint's {INDEX_FILE} lists tensor {name} in {file}, which does not "
                             "hold it; the index and the shards come from different saves: download or copy the "
                             "whole checkpoint again")
    return tensors


def check_checkpoint_folder(folder: str | os.PathLike) -> dict[str, TensorEntry]:
    """:func:`weight_files` and :func:`check_weight_files` of the checkpoint in ``folder``."""
    files, weight_map = weight_files(folder)
    return check_weight_files(files, weight_map)


def check_shapes(tensors: dict[str, TensorEntry], model: Any) -> None:
    """Refuse checkpoint tensors whose shape differs from that of the model's tensor of the same name (``model``:
    the model to load them into, weightless ``meta`` tensors will do; names the model does not use, or uses after a
    conversion, are left to transformers)."""
    wrong = [(name, list(entry.shape), list(expected.shape)) for name, expected in model.state_dict().items()
             if (entry := tensors.get(name)) is not None and tuple(expected.shape) != entry.shape]
    if wrong:
        name, got, want = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ValueError(f"model: the checkpoint's tensor {name} has shape {got}, but its config.json describes "
                         f"{want}{more}: config.json and the weights do not belong together; restore the checkpoint's "
                         "own config.json")


def check_against_config(config: Any, tensors: dict[str, TensorEntry]) -> None:
    """:func:`check_shapes` of ``tensors`` against a ``meta`` skeleton built from ``config`` (no weight memory); a
    quantized checkpoint (``quantization_config``: this package's compact format, GPTQ, ...) stores its weights in
    other shapes and is not checked."""
    import torch
    from transformers import AutoModelForCausalLM

    if getattr(config, "quantization_config", None) is not None:
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    check_shapes(tensors, skeleton)


def read_config_file(folder: str | os.PathLike) -> Any:
    """The checkpoint's ``config.json`` as transformers reads it (a ``PretrainedConfig``); ValueError naming
    ``config.json`` when it is missing, not a JSON object, or refused by transformers."""
    from transformers import AutoConfig

    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"model: {path.parent.name}/config.json cannot be read ({exc.strerror})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"model: {path.parent.name}/config.json is not valid JSON ({exc}); restore the "
                         "checkpoint's config.json") from None
    if not isinstance(raw, dict):
        raise ValueError(f"model: {path.parent.name}/config.json is not a JSON object; restore the checkpoint's "
                         "config.json")
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as exc:  # transformers' many ways to refuse a config (unknown model_type, bad values)
        reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"model: transformers cannot read {path.parent.name}/config.json: {reason[:200]}") from None


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds any tokenizer file (:data:`TOKENIZER_PATTERNS`)."""
    import fnmatch

    path = Path(folder)
    return path.is_dir() and any(p.is_file() and any(fnmatch.fnmatchcase(p.name, t) for t in TOKENIZER_PATTERNS)
                                 for p in path.iterdir())


def missing_tokenizer(folder: str | os.PathLike, how: str = "tokenizer=") -> ValueError:
    """The error for a model folder without tokenizer files: says so, and how to pass one (``how``)."""
    return ValueError(f"tokenizer: the model folder {Path(folder).name!r} holds no tokenizer (none of tokenizer.json, "
                      f"tokenizer_config.json, vocab/merges or *.model); pass the model's tokenizer with {how} (a "
                      "tokenizer object, or the folder or hub id it is saved in)")
