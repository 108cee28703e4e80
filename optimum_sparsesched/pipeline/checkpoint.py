"""Resumable compression: every finished block is saved, so a run killed at hour three restarts where it stopped.

``checkpoint_dir`` holds ``block_00007.safetensors`` (the compressed weights of block 7's modules) for every
finished block and ``manifest.json``: the run's fingerprint, the per-module targets of the schedule (so a resumed
run does not re-measure them), and the per-module results so far. Files are written to a temporary name and
renamed, the manifest after the block file, so a kill at any instant leaves a consistent checkpoint.

The fingerprint is a SHA-256 over the options that change the result (``config.fingerprint_options()``), the
calibration token windows and the model's parameter names, shapes and dtypes: resuming with anything different is
refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..obs.grid import module_grid, set_module_grid


def fingerprint(config: Any, windows: torch.Tensor, model: torch.nn.Module) -> str:
    """SHA-256 of the result-defining options, the calibration windows and the model's parameter layout."""
    h = hashlib.sha256()
    h.update(json.dumps(config.fingerprint_options(), sort_keys=True, default=str).encode())
    h.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class BlockCheckpoint:
    """The checkpoint folder of one compression run."""

    def __init__(self, folder: str | os.PathLike, run_fingerprint: str) -> None:
        self.folder = Path(folder)
        self.fingerprint = run_fingerprint
        self.manifest_path = self.folder / "manifest.json"

    def load(self) -> dict[str, Any] | None:
        """The manifest of an earlier run with the same fingerprint, or None for a fresh folder.
        Raises ValueError when the folder holds a different run."""
        if not self.manifest_path.exists():
            return None
        manifest = json.loads(self.manifest_path.read_text())
        if manifest.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"checkpoint_dir: {str(self.folder)!r} holds a run with other options, calibration data or model "
                f"(fingerprint {str(manifest.get('fingerprint'))[:12]}… != {self.fingerprint[:12]}…); refusing to "
                "resume from it. Use a new folder or delete this one.")
        return manifest

    def start(self, targets: dict[str, float], estimates: dict[str, float],
              resolved_range: list[float] | None) -> dict[str, Any]:
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = {"fingerprint": self.fingerprint, "targets": targets, "estimates": estimates,
                    "resolved_range": resolved_range, "finished_blocks": 0, "achieved": {}, "errors": {}}
        _atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=1).encode())
        return manifest

    def block_path(self, index: int) -> Path:
        return self.folder / f"block_{index:05d}.safetensors"

    def save_block(self, manifest: dict[str, Any], index: int, weights: dict[str, torch.Tensor],
                   achieved: dict[str, float], errors: dict[str, float]) -> None:
        """Save block ``index``'s compressed weights, then record it as finished in the manifest."""
        tmp = self.block_path(index).with_name(self.block_path(index).name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp))
        os.replace(tmp, self.block_path(index))
        manifest["finished_blocks"] = index + 1
        manifest["achieved"].update(achieved)
        manifest["errors"].update(errors)
        _atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=1).encode())

    def load_block(self, index: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.block_path(index)))


def block_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """What a finished block's checkpoint holds: every module's weight (``NAME``) and, when quantized, its grids
    (``NAME.grid_scale``, ``NAME.grid_zero``)."""
    state = {n: m.weight for n, m in modules.items()}
    for n, m in modules.items():
        grid = module_grid(m)
        if grid is not None:
            state[f"{n}.grid_scale"], state[f"{n}.grid_zero"] = grid
    return state


def restore_block(modules: dict[str, nn.Module], saved: dict[str, torch.Tensor]) -> None:
    """Put a finished block's checkpoint (:func:`block_state`) back into its modules."""
    for name, m in modules.items():
        m.weight.data.copy_(saved[name])
        if f"{name}.grid_scale" in saved:
            set_module_grid(m, (saved[f"{name}.grid_scale"], saved[f"{name}.grid_zero"]))
