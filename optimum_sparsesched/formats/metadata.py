"""What every weight file saved by this package records in its safetensors header, and the check made on load.

transformers writes the metadata the quantizer returns from ``get_state_dict_and_metadata`` into the header of every
shard. Ours (all ``str``, as safetensors requires):

- ``optimum_sparsesched``: the package version. It marks the file as written by this package, so a later save into
  the same folder may replace or remove it (:mod:`..publish.staging`) — never a file without it;
- ``sparse_schedule_format``: ``export_format`` (``"compact"``, ``"dense"``, ``"compressed-tensors"``);
- ``sparse_schedule_bits``, ``sparse_schedule_group_size``, ``sparse_schedule_sym``: the grid the weights were
  encoded with (``bits`` ``"None"`` when unquantized);
- ``sparse_schedule_results``: the first 16 hex digits of the SHA-256 of the run's per-module sparsities
  (``results.layer_sparsities`` as sorted JSON), which ``config.json`` holds too;
- ``sparse_schedule_options``: the options that describe the stored weights (:data:`WEIGHT_OPTIONS`: sparsity,
  pattern, schedule, grid, export format, solver ...), as JSON;
- ``sparse_schedule_tensors`` (files of the block-by-block writer, every save of this package but a plain
  ``type(model).save_pretrained``): the content digest of every tensor of the file (:func:`tensor_digest`), as JSON.

On load (:func:`check_weights_metadata`, before transformers reads the weights) ``config.json`` must describe the
weights the files hold: its recorded options unedited (an edited ``bits``, ``group_size`` or ``sym`` would decode
wrong weights; an edited ``pattern`` or ``sparsity`` would make the card claim what the weights are not), its
sparsities those the weights were saved with (a folder whose weights and ``config.json`` come from different saves
— a save killed between its renames, files copied between checkpoints — is refused instead of loading a mix), and
every tensor must match its digest and none may be missing (a flipped byte in a value, a deleted tensor): each
refusal a ``ValueError`` naming the file and the option or tensor. Files saved by optimum-sparsesched 0.2 and earlier
have no such keys and are not checked.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Mapping

import torch

from ..version import __version__
from .spec import ExportSpec

WRITER_KEY = "optimum_sparsesched"
FORMAT_KEY = "sparse_schedule_format"
RESULTS_KEY = "sparse_schedule_results"
OPTIONS_KEY = "sparse_schedule_options"
DIGESTS_KEY = "sparse_schedule_tensors"
#: the options that describe the stored weights: config.json may not hold other values than the files recorded
WEIGHT_OPTIONS = ("sparsity", "pattern", "schedule", "bits", "group_size", "sym", "export_format", "preset", "solver",
                  "search_steps", "reconstruct_epochs")
GRID_KEYS = {"bits": "sparse_schedule_bits", "group_size": "sparse_schedule_group_size", "sym": "sparse_schedule_sym"}


def results_digest(layer_sparsities: dict[str, float]) -> str:
    """16 hex digits identifying a run's results: SHA-256 of ``layer_sparsities`` as sorted JSON."""
    return hashlib.sha256(json.dumps(layer_sparsities, sort_keys=True).encode()).hexdigest()[:16]


def tensor_digest(tensor: torch.Tensor) -> str:
    """32 hex digits identifying a tensor: SHA-256 of its dtype, shape and bytes."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)};".encode())
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()[:32]


def weights_metadata(spec: ExportSpec, layer_sparsities: Mapping[str, float],
                     options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The header metadata of every weight file of a checkpoint stored as ``spec`` whose run achieved
    ``layer_sparsities``, with the :data:`WEIGHT_OPTIONS` of ``options`` (the config's)."""
    out = {WRITER_KEY: __version__, FORMAT_KEY: str(spec.format), RESULTS_KEY: results_digest(dict(layer_sparsities))}
    out.update({key: str(getattr(spec, option)) for option, key in GRID_KEYS.items()})
    if options is not None:
        out[OPTIONS_KEY] = json.dumps({k: options[k] for k in WEIGHT_OPTIONS if k in options}, sort_keys=True)
    return out


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON header of a safetensors file (``{key: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``),
    or None when ``path`` is not a readable safetensors file. Reads the header only."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return header if isinstance(header, dict) else None


def read_weights_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The header metadata of a safetensors file (``{}`` when it has none), or None when ``path`` is not a readable
    safetensors file. Reads the header only."""
    header = read_safetensors_header(path)
    if header is None:
        return None
    metadata = header.get("__metadata__")
    return dict(metadata) if isinstance(metadata, dict) else {}


def written_by_this_package(path: str | os.PathLike) -> bool:
    """Whether the safetensors file at ``path`` was saved by this package (its header carries our keys; compact
    checkpoints of 0.2 and earlier carry ``sparse_schedule_format``)."""
    metadata = read_weights_metadata(path)
    return bool(metadata) and (WRITER_KEY in metadata or FORMAT_KEY in metadata)


def check_weights_metadata(files: Iterable[str | os.PathLike], spec: ExportSpec,
                           layer_sparsities: Mapping[str, float], options: Mapping[str, Any] | None = None) -> None:
    """Refuse to load when ``config.json`` (its grid options ``spec``, its ``options`` and results
    ``layer_sparsities``) does not describe what the weight files recorded, or a tensor of a file does not match its
    digest (see the module docstring). ``ValueError`` naming the file and the field or tensor."""
    expected_results = results_digest(dict(layer_sparsities))
    for path in files:
        metadata = read_weights_metadata(path) if str(path).endswith(".safetensors") else None
        if not metadata or WRITER_KEY not in metadata:
            continue  # not ours, or saved before these keys existed
        name = os.path.basename(os.fspath(path))
        if metadata.get(RESULTS_KEY, expected_results) != expected_results:
            raise ValueError(
                f"config.json: its quantization_config.results are not those {name} was saved with (results digest "
                f"{expected_results} != {metadata[RESULTS_KEY]}): config.json and the weights come from different "
                "saves (a save interrupted while it replaced the files, or files copied between checkpoints). Save "
                "the model again into this folder.")
        recorded = {option: metadata[key] for option, key in GRID_KEYS.items() if key in metadata}
        if metadata.get(FORMAT_KEY) == "compact" and recorded.get("bits") not in (None, "None"):
            for option, value in recorded.items():
                if value != str(getattr(spec, option)):
                    raise ValueError(
                        f"config.json: quantization_config.{option}={getattr(spec, option)!r}, but the weights in "
                        f"{name} were encoded with {option}={value}; decoding them with the edited value "
                        f"would give wrong weights. Restore {option}={value} in config.json.")
        if options is not None and OPTIONS_KEY in metadata:
            for option, value in json.loads(metadata[OPTIONS_KEY]).items():
                if option in options and options[option] != value:
                    raise ValueError(
                        f"config.json: quantization_config.{option}={options[option]!r}, but the weights in {name} "
                        f"were saved with {option}={value!r}: config.json no longer describes these weights (edited "
                        f"by hand?). Restore {option}={value!r} in config.json.")
        if DIGESTS_KEY in metadata:
            check_tensor_digests(path, json.loads(metadata[DIGESTS_KEY]))


def check_tensor_digests(path: str | os.PathLike, digests: Mapping[str, str]) -> None:
    """Every tensor of the safetensors file ``path`` is listed in ``digests`` and matches its digest, and every
    listed tensor is there (tensors hashed on all cores). ``ValueError`` naming the file and the tensor."""
    from safetensors import safe_open

    name = os.path.basename(os.fspath(path))
    with safe_open(os.fspath(path), framework="pt") as f:
        keys = set(f.keys())
        for tensor in sorted(set(digests) ^ keys):
            problem = "is missing" if tensor in digests else "was not written by this package's save"
            raise ValueError(f"{name}: tensor {tensor} {problem}: the checkpoint is damaged or edited; it is refused")
        workers = os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=workers) as pool:  # read one at a time, hash in parallel
            pending: list = []
            for tensor in digests:
                pending.append((tensor, pool.submit(tensor_digest, f.get_tensor(tensor))))
                if len(pending) > 2 * workers:
                    _compare(name, digests, *pending.pop(0))
            for item in pending:
                _compare(name, digests, *item)


def _compare(name: str, digests: Mapping[str, str], tensor: str, digest: Any) -> None:
    """Refuse ``tensor`` of file ``name`` when its ``digest`` (a future) is not the recorded one."""
    if digest.result() != digests[tensor]:
        raise ValueError(f"{name}: tensor {tensor} does not match the digest recorded when it was saved (its bytes, "
                         "dtype or shape changed: the checkpoint is damaged or edited); it is refused")
