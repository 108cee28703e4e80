"""Saving a compressed model into a folder the user owns, with its model card, never losing or mixing anything.

``save_pretrained`` of a compressed model (installed on the instance by :func:`install_save`) writes the checkpoint
block by block (:func:`.writer.write_checkpoint`, the one writer of every mode: in memory, offloaded by accelerate,
streamed) into a private staging folder inside the target, adds the model card (``README.md`` and
``sparsity_schedule.png``, see :mod:`.model_card`) unless the folder holds a README you wrote
(:func:`.writer.finish_folder`), and swaps the files in one by one, ``config.json`` last
(:func:`.staging.staged_folder`): only the files this save writes are replaced, stale weight files of an earlier
save of ours are removed, everything else in the folder (``.git/``, subfolders, your files, tokenizer files) stays
as it was, and a failure before the swap leaves the folder untouched. A folder holding a model this package did not
write, or the folder the model was compressed from (its original weights), is refused unless
``save_pretrained(..., overwrite=True)`` (:func:`.staging.check_overwrite`). A save into (or around) the run's
``checkpoint_dir`` is refused: the resume state would be mixed into the published checkpoint. Under
torch.distributed only rank 0 writes. ``type(model).save_pretrained(model, ...)`` goes around all this: a plain
transformers save of the same tensors (the quantizer's state dict), without card or staging.

``save_pretrained(..., push_to_hub=True)`` saves the same way, then uploads the folder with
:func:`optimum_sparsesched.push_to_hub` (repo named after the folder unless ``repo_id`` is given), and
``model.push_to_hub(repo_id)`` saves into a temporary folder and uploads it: both publish this package's card, not
transformers' template README.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

from ..pipeline.distributed import is_main_process
from .hub import check_repo_id, push_to_hub
from .staging import staged_folder
from .writer import check_save_kwargs, finish_folder, write_checkpoint

#: instance attribute: the folder a compressed model's original weights were loaded from
SOURCE_ATTR = "_sparse_schedule_source"
#: ``save_pretrained(push_to_hub=True, ...)`` keywords that go to the upload, not to the save
HUB_KWARGS = ("repo_id", "commit_message", "commit_description", "create_pr", "token", "private", "revision")


def atomic_save_pretrained(model: Any, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    """``type(model).save_pretrained`` and the model card into a staging folder, then swapped into
    ``save_directory`` file by file (:func:`.staging.staged_folder`); with ``push_to_hub=True`` then upload it.
    ``overwrite=True``: replace a model this package did not write, or the model's own source folder."""
    if not is_main_process():
        return None  # rank 0 writes the checkpoint
    overwrite = kwargs.pop("overwrite", False)
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite: {overwrite!r} is not valid; allowed: True or False")
    if kwargs.pop("push_to_hub", False):

        hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        repo_id = check_repo_id(hub.pop("repo_id", None) or Path(save_directory).name)  # as transformers names it
        result = _save(model, Path(save_directory), args, kwargs, repo_id=repo_id, overwrite=overwrite)
        push_to_hub(save_directory, repo_id, **hub)
        return result
    return _save(model, Path(save_directory), args, kwargs, overwrite=overwrite)


def check_apart_from_checkpoint_dir(model: Any, target: Path) -> None:
    """Refuse a save folder that is the run's ``checkpoint_dir``, inside it or around it."""
    check_folders_apart(getattr(getattr(model.config, "quantization_config", None), "checkpoint_dir", None), target)


def check_folders_apart(checkpoint_dir: Any, target: Path) -> None:
    """Refuse a save folder ``target`` that is ``checkpoint_dir``, inside it or around it (ValueError)."""
    if not isinstance(checkpoint_dir, (str, os.PathLike)) or not str(checkpoint_dir):
        return
    save, resume = Path(os.path.realpath(target)), Path(os.path.realpath(checkpoint_dir))
    if save == resume or resume in save.parents or save in resume.parents:
        raise ValueError(
            f"save_directory: {str(target)!r} overlaps checkpoint_dir={str(checkpoint_dir)!r} of this run (the same "
            "folder, or one inside the other): the resume state (block files, manifest) would be mixed into the saved "
            "checkpoint and uploaded with it, and deleting the resume state would delete the model. Save into a "
            "folder apart from checkpoint_dir; the model in memory is unchanged.")


def _save(model: Any, target: Path, args: tuple, kwargs: dict, repo_id: str | None = None,
          extra_tags: Iterable[str] = (), overwrite: bool = False) -> None:
    check_save_kwargs(args, kwargs)
    check_apart_from_checkpoint_dir(model, target)
    if kwargs.get("is_main_process", True) is False:
        return None
    with staged_folder(target, overwrite, source=model.__dict__.get(SOURCE_ATTR)) as staging:
        write_checkpoint(model, staging, model.config.quantization_config, kwargs.get("max_shard_size") or "50GB",
                         kwargs.get("save_original_format", True))
        finish_folder(model, staging, target, model_name=repo_id.split("/")[-1] if repo_id else target.name,
                      repo_id=repo_id, extra_tags=extra_tags)
    return None


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


def install_save(model: Any, source: str | os.PathLike | None = None) -> None:
    """Make ``model.save_pretrained`` atomic (with the model card) and ``model.push_to_hub`` publish the card, for
    this instance. ``source``: the folder the model was compressed from (its ``name_or_path``), which a save then
    refuses to replace without ``overwrite=True``."""
    if source:
        model.__dict__[SOURCE_ATTR] = os.fspath(source)
    model.save_pretrained = functools.partial(atomic_save_pretrained, model)
    model.push_to_hub = functools.partial(push_model_to_hub, model)
