"""Saving a compressed model without ever leaving a half-written folder.

``save_pretrained`` of a compressed model (installed on the instance by :func:`install_atomic_save`) writes the
whole checkpoint into a sibling temporary folder, then swaps it in with renames: the old folder is moved aside,
the new one renamed into place, the old one deleted. If anything fails before the swap, the temporary folder is
removed and the old folder is exactly as it was. Files of the old folder that the new checkpoint does not write
(a README, a license, ...) are carried over, except stale weight files. Under torch.distributed only rank 0 writes.
"""

from __future__ import annotations

import functools
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def atomic_save_pretrained(model: Any, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """``type(model).save_pretrained`` into a temporary sibling folder, then rename it to ``save_directory``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None  # rank 0 writes the checkpoint
    if kwargs.get("push_to_hub"):  # pushing names the repo after the folder: let transformers handle it directly
        return type(model).save_pretrained(model, save_directory, *args, **kwargs)
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_directory: {str(target)!r} is a file, not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        result = type(model).save_pretrained(model, tmp, *args, **kwargs)
        if target.exists():
            for old in target.iterdir():
                if old.is_file() and not (tmp / old.name).exists() and not old.name.endswith(WEIGHT_SUFFIXES):
                    shutil.copy2(old, tmp / old.name)
            aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, aside)
            os.replace(tmp, target)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def install_atomic_save(model: Any) -> None:
    """Make ``model.save_pretrained`` atomic for this instance."""
    model.save_pretrained = functools.partial(atomic_save_pretrained, model)
