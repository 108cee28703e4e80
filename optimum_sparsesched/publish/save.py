"""Saving a compressed model without ever leaving a half-written folder, with its model card.

``save_pretrained`` of a compressed model (installed on the instance by :func:`install_save`) writes the
whole checkpoint into a sibling temporary folder, then swaps it in with renames: the old folder is moved aside,
the new one renamed into place, the old one deleted. If anything fails before the swap, the temporary folder is
removed and the old folder is exactly as it was. The model card (``README.md`` and ``sparsity_schedule.png``, see
:mod:`.model_card`) is written into the temporary folder too. Files of the old folder that the new checkpoint does
not write (a license, notes, a README that this package did not write, ...) are carried over, except stale weight
files. Under torch.distributed only rank 0 writes. A model whose weights accelerate offloaded is written block by
block (:func:`.export.save_offloaded`) instead of by transformers, which would gather whole shards in memory.

``save_pretrained(..., push_to_hub=True)`` saves the same way, then uploads the folder with
:func:`optimum_sparsesched.push_to_hub` (repo named after the folder unless ``repo_id`` is given), and
``model.push_to_hub(repo_id)`` saves into a temporary folder and uploads it: both publish this package's card, not
transformers' template README.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable

from ..formats.compressed_tensors import rewrite_config_json
from ..pipeline.distributed import is_main_process
from ..pipeline.offload import has_offloaded_weights
from .export import save_offloaded
from .hub import check_repo_id, push_to_hub
from .model_card import CARD_FILE, card_for_model, is_own_card

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
#: ``save_pretrained(push_to_hub=True, ...)`` keywords that go to the upload, not to the save
HUB_KWARGS = ("repo_id", "commit_message", "commit_description", "create_pr", "token", "private", "revision")


def atomic_save_pretrained(model: Any, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """``type(model).save_pretrained`` and the model card into a temporary sibling folder, then rename it to
    ``save_directory``; with ``push_to_hub=True`` then upload the folder."""
    if not is_main_process():
        return None  # rank 0 writes the checkpoint
    if kwargs.pop("push_to_hub", False):

        hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        repo_id = check_repo_id(hub.pop("repo_id", None) or Path(save_directory).name)  # as transformers names it
        result = _save(model, Path(save_directory), args, kwargs, repo_id=repo_id)
        push_to_hub(save_directory, repo_id, **hub)
        return result
    return _save(model, Path(save_directory), args, kwargs)


def _save(model: Any, target: Path, args: tuple, kwargs: dict, repo_id: str | None = None,
          extra_tags: Iterable[str] = ()) -> Any:
    if target.exists() and not target.is_dir():
        raise ValueError(f"save_directory: {str(target)!r} is a file, not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if has_offloaded_weights(model):  # weights offloaded by accelerate: written block by block (.export)
            result = save_offloaded(model, tmp, *args, **kwargs)
        else:
            result = type(model).save_pretrained(model, tmp, *args, **kwargs)
        config = getattr(model.config, "quantization_config", None)
        if getattr(config, "export_format", None) == "compressed-tensors":
            rewrite_config_json(tmp, model, config)
        if not (target / CARD_FILE).is_file() or is_own_card(target / CARD_FILE):  # a user's README is kept
            card_for_model(model, tmp, model_name=repo_id.split("/")[-1] if repo_id else target.name,
                           repo_id=repo_id, extra_tags=extra_tags)
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


def push_model_to_hub(model: Any, repo_id: str, *, commit_message: str | None = None,
                      commit_description: str | None = None, private: bool | None = None,
                      token: bool | str | None = None, revision: str | None = None, create_pr: bool = False,
                      max_shard_size: int | str | None = "50GB", tags: list[str] | None = None) -> str:
    """``model.push_to_hub`` of a compressed model (transformers' signature): save with the card into a temporary
    folder and upload it with :func:`optimum_sparsesched.push_to_hub`. Returns the commit URL (a ``CommitInfo``).

    transformers' own ``push_to_hub`` would overwrite the card with the repo's README or its template."""
    check_repo_id(repo_id)
    if not is_main_process():
        return None  # rank 0 saves and uploads
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / repo_id.split("/")[-1]
        _save(model, folder, (), {"max_shard_size": max_shard_size}, repo_id=repo_id,
              extra_tags=[tags] if isinstance(tags, str) else tags or ())
        return push_to_hub(folder, repo_id, token=token, private=private, commit_message=commit_message,
                           commit_description=commit_description, revision=revision, create_pr=create_pr)


def install_save(model: Any) -> None:
    """Make ``model.save_pretrained`` atomic (with the model card) and ``model.push_to_hub`` publish the card, for
    this instance."""
    model.save_pretrained = functools.partial(atomic_save_pretrained, model)
    model.push_to_hub = functools.partial(push_model_to_hub, model)
