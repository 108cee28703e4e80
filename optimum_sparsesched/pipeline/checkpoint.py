"""Resumable compression: every finished block is saved, so a run killed at hour three restarts where it stopped.

``checkpoint_dir`` holds ``block_00007.safetensors`` (the compressed weights of block 7's modules) for every
finished block and ``manifest.json``: the run's fingerprint, the per-module targets of the schedule (so a resumed
run does not re-measure them), the per-module results so far, the SHA-256 of every block file, and digests of the
model's weights before compression. Files are written under names unique to the run, fsynced and renamed, the
manifest after the block file, so a kill at any instant leaves a consistent checkpoint.

Nothing read back is trusted:

- the fingerprint (SHA-256 over the options that change the result, ``config.fingerprint_options()``, the
  calibration token windows and the model's parameter names, shapes and dtypes) must match, and so must the weights:
  ``manifest["weights"]`` holds a SHA-256 of the parameters outside the decoder blocks and one per block (of its
  parameters before compression, :mod:`.digest`), checked before the model is touched; another
  fine-tune of the same architecture is refused;
- a damaged manifest (truncated, not JSON, missing fields) is refused with a ``ValueError`` naming ``checkpoint_dir``;
- each block file is verified against its SHA-256 before use; a damaged or missing one is recomputed, with every
  block after it, with a warning naming the file.

One run at a time: :meth:`BlockCheckpoint.open` takes an exclusive ``flock`` on ``checkpoint_dir/run.lock``
(a second run is refused with a ``ValueError`` naming ``checkpoint_dir``), and is also where an unwritable
``checkpoint_dir`` is found, before any work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes, save_file
from torch import nn

from ..obs.grid import Grid
from .digest import file_sha256

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 2
LOCK_FILE = "run.lock"
_TEMP = re.compile(r"\..+\.\d+-[0-9a-f]{8}\.tmp|(block_\d{5}\.safetensors|manifest\.json)\.tmp")


def fingerprint(options: dict[str, Any], windows: torch.Tensor, model: torch.nn.Module) -> str:
    """SHA-256 of the result-defining ``options`` (``config.fingerprint_options()``), the calibration windows and the
    model's parameter layout."""
    h = hashlib.sha256()
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    h.update(windows.to(torch.int64).contiguous().numpy().tobytes())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class BlockCheckpoint:
    """The checkpoint folder of one compression run."""

    def __init__(self, folder: str | os.PathLike, run_fingerprint: str = "") -> None:
        self.folder = Path(folder)
        self.fingerprint = run_fingerprint
        self.manifest_path = self.folder / "manifest.json"
        self._lock: int | None = None
        self._tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _bad(self, problem: str) -> ValueError:
        return ValueError(f"checkpoint_dir: {str(self.folder)!r} {problem}")

    # ------------------------------------------------------------------ the folder
    def open(self) -> None:
        """Create the folder, prove it writable, take the run lock and remove temporary files of killed runs."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / f".probe.{self._tag}.tmp"
            _write_bytes(probe, b"")
            probe.unlink()
            fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self._bad(f"is not a writable folder ({exc.strerror or exc}); every finished block is saved there, "
                            "so it must be: choose another checkpoint_dir") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._bad(f"is in use by another compression run (it holds {LOCK_FILE}); wait for it to end "
                                "or use another checkpoint_dir") from None
            except OSError as exc:  # a filesystem without flock
                logger.warning("checkpoint_dir %s cannot be locked (%s): do not start two runs in it", self.folder, exc)
        self._lock = fd
        for entry in self.folder.iterdir():
            if _TEMP.fullmatch(entry.name) and entry.is_file():
                entry.unlink()

    def close(self) -> None:
        """Release the run lock."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # ------------------------------------------------------------------ the manifest
    def load(self) -> dict[str, Any] | None:
        """The manifest of an earlier run with the same fingerprint, or None for a fresh folder. ValueError naming
        ``checkpoint_dir`` when the folder holds a different run or a damaged manifest."""
        if not self.manifest_path.exists():
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise self._bad(f"has a manifest.json that cannot be read ({exc}): the file is damaged. Delete the "
                            "folder (its blocks cannot be trusted) or use another checkpoint_dir") from None
        if not isinstance(manifest, dict):
            raise self._bad("has a manifest.json that is not a JSON object: the file is damaged. Delete the folder "
                            "or use another checkpoint_dir")
        if manifest.get("version") != MANIFEST_VERSION:
            raise self._bad("holds a manifest.json of another version of optimum-sparsesched (without checksums of "
                            "its blocks); refusing to resume from it. Delete the folder or use another one")
        if manifest.get("fingerprint") != self.fingerprint:
            raise self._bad(
                f"holds a run with other options, calibration data or model (fingerprint "
                f"{str(manifest.get('fingerprint'))[:12]}… != {self.fingerprint[:12]}…); refusing to resume from it. "
                "Use a new folder or delete this one.")
        self._check_fields(manifest)
        return manifest

    def _check_fields(self, m: dict[str, Any]) -> None:
        def number_map(v: Any) -> bool:
            return isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values())

        weights, files = m.get("weights"), m.get("files")
        finished = m.get("finished_blocks")
        ok = (number_map(m.get("targets")) and number_map(m.get("estimates")) and number_map(m.get("achieved"))
              and number_map(m.get("errors")) and isinstance(finished, int) and finished >= 0
              and isinstance(weights, dict) and isinstance(weights.get("outside"), str)
              and isinstance(weights.get("blocks"), dict) and isinstance(files, dict)
              and all(isinstance(files.get(str(i)), str) for i in range(finished))
              and (m.get("resolved_range") is None or isinstance(m.get("resolved_range"), list)))
        if not ok:
            raise self._bad("has a manifest.json with missing or malformed fields: the file is damaged. Delete the "
                            "folder or use another checkpoint_dir")

    def check_weights(self, manifest: dict[str, Any], outside: str, block_digest: Callable[[int], str]) -> None:
        """Refuse to resume when the model's weights are not those of the run that wrote ``manifest``: the digest of
        the parameters outside the blocks, and of every block the manifest recorded."""
        if manifest["weights"]["outside"] != outside:
            raise self._bad("holds a run of a model with other weights outside the decoder blocks (embeddings, "
                            "norms, head); refusing to resume from it. Use a new folder or delete this one.")
        for key, digest in sorted(manifest["weights"]["blocks"].items(), key=lambda kv: int(kv[0])):
            if block_digest(int(key)) != digest:
                raise self._bad(f"holds a run of a model whose decoder block {key} had other weights (another "
                                "fine-tune of the same architecture?); refusing to resume from it. Use a new folder "
                                "or delete this one.")

    def start(self, targets: dict[str, float], estimates: dict[str, float], resolved_range: list[float] | None,
              outside: str, block_digests: dict[int, str]) -> dict[str, Any]:
        """Write the manifest of a fresh run: its schedule and the digests of the weights known so far."""
        manifest = {"version": MANIFEST_VERSION, "fingerprint": self.fingerprint, "targets": targets,
                    "estimates": estimates, "resolved_range": resolved_range, "finished_blocks": 0, "achieved": {},
                    "errors": {}, "weights": {"outside": outside, "blocks": {str(k): v for k, v in
                                                                              block_digests.items()}}, "files": {}}
        self._write_manifest(manifest)
        return manifest

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        tmp = self.folder / f".manifest.json.{self._tag}.tmp"
        _write_bytes(tmp, json.dumps(manifest, indent=1).encode())
        os.replace(tmp, self.manifest_path)

    # ------------------------------------------------------------------ blocks
    def block_path(self, index: int) -> Path:
        return self.folder / f"block_{index:05d}.safetensors"

    def save_block(self, manifest: dict[str, Any], index: int, weights: dict[str, torch.Tensor],
                   achieved: dict[str, float], errors: dict[str, float], digest: str) -> None:
        """Save block ``index``'s compressed weights (``digest``: of its weights before compression), then record it
        as finished in the manifest with the file's SHA-256."""
        path = self.block_path(index)
        tmp = self.folder / f".{path.name}.{self._tag}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        checksum = file_sha256(tmp)
        os.replace(tmp, path)
        manifest["finished_blocks"] = index + 1
        manifest["achieved"].update(achieved)
        manifest["errors"].update(errors)
        manifest["weights"]["blocks"][str(index)] = digest
        manifest["files"][str(index)] = checksum
        self._write_manifest(manifest)

    def load_block(self, manifest: dict[str, Any], index: int) -> dict[str, torch.Tensor] | None:
        """Block ``index``'s saved weights once their SHA-256 matches the manifest; None, with a warning naming the
        file, when the file is missing or damaged (the caller recomputes it)."""
        path = self.block_path(index)
        try:
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != manifest["files"].get(str(index)):
                raise ValueError("its SHA-256 is not the one recorded in manifest.json")
            return load_bytes(data)
        except (OSError, ValueError, SafetensorError) as exc:
            logger.warning("checkpoint_dir: %s is damaged or missing (%s); recomputing block %d and every block "
                           "after it", path, exc, index)
            return None


def block_state(modules: dict[str, nn.Module], grids: dict[str, Grid]) -> dict[str, torch.Tensor]:
    """What a finished block's checkpoint holds: every module's weight (``NAME``, in the module's layout) and, when
    quantized, its grid (``NAME.grid_scale``, ``NAME.grid_zero``)."""
    state = {n: m.weight for n, m in modules.items()}
    for n, (scale, zero) in grids.items():
        state[f"{n}.grid_scale"], state[f"{n}.grid_zero"] = scale, zero
    return state


def restore_block(modules: dict[str, nn.Module], saved: dict[str, torch.Tensor]) -> dict[str, Grid]:
    """Put a finished block's checkpoint (:func:`block_state`) back into its modules; returns its grids."""
    for name, m in modules.items():
        m.weight.data.copy_(saved[name])
    return {name: (saved[f"{name}.grid_scale"], saved[f"{name}.grid_zero"])
            for name in modules if f"{name}.grid_scale" in saved}
