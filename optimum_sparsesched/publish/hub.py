"""Publishing a compressed checkpoint on the Hugging Face Hub.

:func:`push_to_hub` checks that a folder is a checkpoint compressed by this package, writes its model card when the
folder has none, creates the repo (``exist_ok``) and uploads the checkpoint's own files with
``HfApi.upload_folder`` (:func:`checkpoint_files`: weights, index, configs, tokenizer files, card, plot, at the top
of the folder; ``include=[...]`` adds more, e.g. ``["*"]`` for everything): a ``.env``, notes or subfolders beside
the checkpoint stay local. Every bad argument raises a ``ValueError`` naming it before any request is made; a Hub
that cannot be reached (offline mode, no network) raises one ``ConnectionError`` naming it. The token is whatever
huggingface_hub resolves (``token=``, ``HF_TOKEN``, ``hf auth login``); it is never printed or written. The
endpoint is huggingface_hub's (``HF_ENDPOINT``) unless ``endpoint=`` is given.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..config import QUANT_METHOD, saved_config_dict
from ..formats.metadata import RESULTS_KEY, read_weights_metadata, results_digest
from ..network import hub_endpoint, unreachable
from ..pipeline.checkpoint_files import TOKENIZER_PATTERNS
from .model_card import CARD_FILE, CARD_RESULTS_KEY, PLOT_FILE, card_for_folder, is_own_card
from .staging import STAGING_PREFIX

#: the files of a saved checkpoint (top level of its folder): weights and index, configs, tokenizer files, card, plot
CHECKPOINT_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                       *TOKENIZER_PATTERNS, "preprocessor_config.json", "processor_config.json", CARD_FILE, PLOT_FILE)


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
def checkpoint_files(folder: str | os.PathLike) -> list[str]:
    """The names of the checkpoint's own files at the top of ``folder`` (:data:`CHECKPOINT_PATTERNS`, and the
    remote-code modules its ``config.json`` names in ``auto_map``)."""
    path = Path(folder)
    patterns = list(CHECKPOINT_PATTERNS)
    try:
        auto_map = json.loads((path / "config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        auto_map = {}
    if isinstance(auto_map, dict):
        refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
        patterns += [r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs]
    return sorted(p.name for p in path.iterdir()
                  if p.is_file() and any(fnmatch.fnmatchcase(p.name, pattern) for pattern in patterns))


def _check_include(include: Any) -> list[str]:
    if isinstance(include, str):
        include = [include]
    if not isinstance(include, (list, tuple)) or not all(isinstance(p, str) and p.strip() for p in include):
        raise ValueError(f"include: {include!r} is not valid; allowed: a list of file name patterns (e.g. ['*.md', "
                         "'eval/*']) uploaded besides the checkpoint's own files")
    return list(include)


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, token: bool | str | None = None,
                private: bool | None = None, commit_message: str | None = None,
                commit_description: str | None = None, revision: str | None = None, create_pr: bool = False,
                endpoint: str | None = None, include: Sequence[str] = ()) -> str:
    """Upload the compressed checkpoint in ``folder`` to the model repo ``repo_id`` (created if needed).

    Writes the model card (``README.md`` + ``sparsity_schedule.png``) into ``folder`` first when it has no
    ``README.md``. Uploads only the checkpoint's own files (:func:`checkpoint_files`) and those matching the
    patterns of ``include`` (huggingface_hub's ``allow_patterns``, paths relative to ``folder``). ``revision``: a
    branch, created from the default branch if missing. ``endpoint``: a Hub URL other than huggingface_hub's
    default. Returns the commit URL (a ``huggingface_hub.CommitInfo``, which is a str). A Hub that cannot be
    reached raises ``ConnectionError`` naming it; nothing is uploaded then.
    """
    from huggingface_hub import HfApi

    check_folder_agrees(folder, check_checkpoint_folder(folder))
    check_repo_id(repo_id)
    for name, value in (("revision", revision), ("endpoint", endpoint), ("commit_message", commit_message)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{name}: {value!r} is not valid; allowed: None or a non-empty string")
    if private is not None and not isinstance(private, bool):
        raise ValueError(f"private: {private!r} is not valid; allowed: None, True or False")
    include = _check_include(include)
    if not (Path(folder) / CARD_FILE).is_file():
        card_for_folder(folder, repo_id=repo_id)
    allow = [glob.escape(name) for name in checkpoint_files(folder)] + include
    api = HfApi(endpoint=endpoint.rstrip("/") if endpoint else None, token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and revision != "main" and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message or "Upload model compressed with optimum-sparsesched",
                                 commit_description=commit_description, allow_patterns=allow,
                                 ignore_patterns=[f"{STAGING_PREFIX}*"])  # what a killed save may have left
    except Exception as exc:  # a Hub out of reach: one line naming it (the CLI exits 2)
        reason = unreachable(exc)
        if reason is None:
            raise
        raise ConnectionError(f"push: the Hugging Face Hub at {hub_endpoint(endpoint)} cannot be reached ({reason}); "
                              "nothing was uploaded: check the network, HF_HUB_OFFLINE and HF_ENDPOINT") from None
