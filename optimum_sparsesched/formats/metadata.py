"""What every weight file saved by this package records in its safetensors header, and the check made on load.

transformers writes the metadata the quantizer returns from ``get_state_dict_and_metadata`` into the header of every
shard. Ours (all ``str``, as safetensors requires):

- ``optimum_sparsesched``: the package version. It marks the file as written by this package, so a later save into
  the same folder may replace or remove it (:mod:`..publish.staging`) — never a file without it;
- ``sparse_schedule_format``: ``export_format`` (``"compact"``, ``"dense"``, ``"compressed-tensors"``);
- ``sparse_schedule_bits``, ``sparse_schedule_group_size``, ``sparse_schedule_sym``: the grid the weights were
  encoded with (``bits`` ``"None"`` when unquantized);
- ``sparse_schedule_results``: the first 16 hex digits of the SHA-256 of the run's per-module sparsities
  (``results.layer_sparsities`` as sorted JSON), which ``config.json`` holds too.

On load (:func:`check_weights_metadata`, before any tensor is read) the options of ``config.json`` must equal the
recorded grid when the weights hold quantization codes (an edited ``bits``, ``group_size`` or ``sym`` would decode
wrong weights), and ``config.json``'s sparsities must be those the weights were saved with: a folder whose weights and
``config.json`` come from different saves (a save killed between its renames, files copied between checkpoints) is
refused instead of loading a mix. Files saved by optimum-sparsesched 0.2 and earlier have no such keys and are not
checked.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

from ..version import __version__

WRITER_KEY = "optimum_sparsesched"
FORMAT_KEY = "sparse_schedule_format"
RESULTS_KEY = "sparse_schedule_results"
GRID_KEYS = {"bits": "sparse_schedule_bits", "group_size": "sparse_schedule_group_size", "sym": "sparse_schedule_sym"}


def results_digest(layer_sparsities: dict[str, float]) -> str:
    """16 hex digits identifying a run's results: SHA-256 of ``layer_sparsities`` as sorted JSON."""
    return hashlib.sha256(json.dumps(layer_sparsities, sort_keys=True).encode()).hexdigest()[:16]


def weights_metadata(config: Any) -> dict[str, str]:
    """The header metadata of every weight file of a checkpoint saved with ``config`` (a SparseScheduleConfig)."""
    out = {WRITER_KEY: __version__, FORMAT_KEY: str(config.export_format),
           RESULTS_KEY: results_digest(dict(config.results.layer_sparsities))}
    out.update({key: str(getattr(config, option)) for option, key in GRID_KEYS.items()})
    return out


def read_weights_metadata(path: str | os.PathLike) -> dict[str, str] | None:
    """The header metadata of a safetensors file (``{}`` when it has none), or None when ``path`` is not a readable
    safetensors file. Reads the header only."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(metadata) if isinstance(metadata, dict) else {}


def written_by_this_package(path: str | os.PathLike) -> bool:
    """Whether the safetensors file at ``path`` was saved by this package (its header carries our keys; compact
    checkpoints of 0.2 and earlier carry ``sparse_schedule_format``)."""
    metadata = read_weights_metadata(path)
    return bool(metadata) and (WRITER_KEY in metadata or FORMAT_KEY in metadata)


def check_weights_metadata(files: Iterable[str | os.PathLike], config: Any) -> None:
    """Refuse to load when ``config`` (from ``config.json``) does not match what the weight files recorded: the grid
    options of quantized weights, and the results digest. ``ValueError`` naming the file and the field."""
    expected_results = results_digest(dict(config.results.layer_sparsities))
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
        if metadata.get(FORMAT_KEY) == "compact" and metadata.get(GRID_KEYS["bits"]) not in (None, "None"):
            for option, key in GRID_KEYS.items():
                if key in metadata and metadata[key] != str(getattr(config, option)):
                    raise ValueError(
                        f"config.json: quantization_config.{option}={getattr(config, option)!r}, but the weights in "
                        f"{name} were encoded with {option}={metadata[key]}; decoding them with the edited value "
                        f"would give wrong weights. Restore {option}={metadata[key]} in config.json.")
