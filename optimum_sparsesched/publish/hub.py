"""Publishing a compressed checkpoint on the Hugging Face Hub.

:func:`push_to_hub` checks that a folder is a checkpoint compressed by this package, writes its model card when the
folder has none, creates the repo (``exist_ok``) and uploads the folder with ``HfApi.upload_folder``. Every bad
argument raises a ``ValueError`` naming it before any request is made. The token is whatever huggingface_hub
resolves (``token=``, ``HF_TOKEN``, ``hf auth login``); it is never printed or written. The endpoint is
huggingface_hub's (``HF_ENDPOINT``) unless ``endpoint=`` is given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import QUANT_METHOD, saved_config_dict
from ..formats.metadata import RESULTS_KEY, read_weights_metadata, results_digest
from .model_card import CARD_FILE, CARD_RESULTS_KEY, card_for_folder, is_own_card
from .staging import STAGING_PREFIX


def check_repo_id(repo_id: Any) -> str:
    """``repo_id`` as huggingface_hub validates it (``name`` or ``owner/name``), else a ValueError naming it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str):
        raise ValueError(f"repo_id: {repo_id!r} is not valid; allowed: a string 'name' or 'owner/name'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"repo_id: {repo_id!r} is not valid; allowed: 'name' or 'owner/name' ({exc})") from None
    return repo_id


def check_checkpoint_folder(folder: Any) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint compressed by this package, else a ValueError naming ``folder``."""
    if not isinstance(folder, (str, os.PathLike)) or not str(folder):
        raise ValueError(f"folder: {folder!r} is not valid; allowed: the path of a saved compressed checkpoint")
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"folder: {str(path)!r} is not an existing folder; allowed: the folder that "
                         "save_pretrained wrote for a compressed model")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"folder: {str(path)!r} has no readable config.json ({exc}); not a saved checkpoint") from None
    if saved_config_dict(config) is None:
        qc = config.get("quantization_config") if isinstance(config, dict) else None
        found = qc.get("quant_method") if isinstance(qc, dict) else None
        raise ValueError(f"folder: {str(path)!r} is not a checkpoint compressed by optimum-sparsesched "
                         f"(config.json quantization_config.quant_method is {found!r}, expected {QUANT_METHOD!r})")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ValueError(f"folder: {str(path)!r} has config.json but no weight files (*.safetensors)")
    return config


def check_folder_agrees(folder: str | os.PathLike, config: dict[str, Any]) -> None:
    """Refuse (``ValueError`` naming ``folder`` and the file) a checkpoint whose weight files, ``config.json`` and
    model card describe different saves (a save killed while it swapped the files in, files copied between
    checkpoints): the results digest each records must be the same."""
    path = Path(folder)
    results = (saved_config_dict(config).get("results") or {}).get("layer_sparsities") or {}
    expected = results_digest(dict(results))
    found = {p.name: (read_weights_metadata(p) or {}).get(RESULTS_KEY) for p in sorted(path.glob("*.safetensors"))}
    card = path / CARD_FILE
    if card.is_file() and is_own_card(card):
        from huggingface_hub import ModelCard

        found[CARD_FILE] = ModelCard.load(card, ignore_metadata_errors=True).data.to_dict().get(CARD_RESULTS_KEY)
    for name, digest in found.items():
        if digest is not None and digest != expected:
            raise ValueError(f"folder: {str(path)!r}: {name} describes another save than config.json (results "
                             f"digest {digest} != {expected}); save the model into this folder again before "
                             "publishing it")


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, token: bool | str | None = None,
                private: bool | None = None, commit_message: str | None = None,
                commit_description: str | None = None, revision: str | None = None, create_pr: bool = False,
                endpoint: str | None = None) -> str:
    """Upload the compressed checkpoint in ``folder`` to the model repo ``repo_id`` (created if needed).

    Writes the model card (``README.md`` + ``sparsity_schedule.png``) into ``folder`` first when it has no
    ``README.md``. ``revision``: a branch, created from the default branch if missing. ``endpoint``: a Hub URL
    other than huggingface_hub's default. Returns the commit URL (a ``huggingface_hub.CommitInfo``, which is a str).
    """
    from huggingface_hub import HfApi

    check_folder_agrees(folder, check_checkpoint_folder(folder))
    check_repo_id(repo_id)
    for name, value in (("revision", revision), ("endpoint", endpoint), ("commit_message", commit_message)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{name}: {value!r} is not valid; allowed: None or a non-empty string")
    if private is not None and not isinstance(private, bool):
        raise ValueError(f"private: {private!r} is not valid; allowed: None, True or False")
    if not (Path(folder) / CARD_FILE).is_file():
        card_for_folder(folder, repo_id=repo_id)
    api = HfApi(endpoint=endpoint.rstrip("/") if endpoint else None, token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and revision != "main" and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision, create_pr=create_pr,
                             commit_message=commit_message or "Upload model compressed with optimum-sparsesched",
                             commit_description=commit_description,
                             ignore_patterns=[f"{STAGING_PREFIX}*"])  # what a killed save may have left
