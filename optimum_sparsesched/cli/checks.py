"""The command line's checks of a source model (its folder, its tokenizer, the loaded model) and its words: the
one-line :class:`UsageError`, library errors renamed to the CLI's options, and what a save actually left in OUT."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class UsageError(ValueError):
    """Bad input to the command line: printed as ``error: <message>``, exit code 2."""

#: the library's argument names -> the command line's
CLI_NAMES = {"src": "model", "out": "OUT", "include": "--include"}
#: protocol options whose message is printed as it is (a text too short is prefixed with the file's name)
PROTOCOL_OPTIONS = ("seq_len", "stride", "max_windows")


def cli_error(exc: Exception, prefix: str = "") -> UsageError:
    """A library ``ValueError`` as the CLI's one line: its argument named as the CLI names it (``src`` is MODEL,
    ``overwrite=True`` is ``--overwrite``); ``prefix`` goes before messages that name no protocol option."""
    message = str(exc).replace("overwrite=True", "--overwrite")
    name, colon, rest = message.partition(": ")
    if colon and name in CLI_NAMES:
        return UsageError(f"{CLI_NAMES[name]}: {rest}")
    return UsageError(message if not prefix or name in PROTOCOL_OPTIONS else prefix + message)


def saved_contents(out: Path) -> str:
    """What a save left in ``out``, in words, read from the folder itself: the model, the tokenizer when its files
    are there, and the model card only when ``README.md`` is this package's (a README of yours is kept)."""
    from ..pipeline.checkpoint_files import has_tokenizer_files
    from ..publish.model_card import CARD_FILE, PLOT_FILE, is_own_card

    parts = ["model", *(["tokenizer"] if has_tokenizer_files(out) else [])]
    card = out / CARD_FILE
    if card.is_file() and is_own_card(card):
        parts.append(f"model card {CARD_FILE}" + (f" with {PLOT_FILE}" if (out / PLOT_FILE).is_file() else ""))
    words = " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts)
    if card.is_file() and not is_own_card(card):
        words += f"; your {CARD_FILE} was kept, so no model card was written"
    return words


def looks_like_path(ref: str) -> bool:
    """Whether a model or tokenizer reference is written as a path rather than a hub id."""
    return ref.startswith((".", "/", "~")) or ref.endswith(("/", os.sep)) or ref.count("/") > 1 or (
        os.sep != "/" and os.sep in ref)


def check_source_folder(path: Path) -> None:
    """A local model folder as a source (:mod:`.pipeline.checkpoint_files`, :mod:`.pipeline.source_check`): its
    config.json readable and of a causal LM, its weight index and safetensors headers whole, every tensor of the
    shape config.json describes."""
    from ..pipeline.checkpoint_files import check_against_config, check_checkpoint_folder, read_config_file
    from ..pipeline.source_check import check_causal_lm_config

    try:
        config = read_config_file(path)
        check_causal_lm_config(config)
        check_against_config(config, check_checkpoint_folder(path))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def check_tokenizer_source(ref: str | None, tokenizer: str | None) -> None:
    """A model folder without tokenizer files needs ``--tokenizer``: refused before any work, saying so."""
    from ..pipeline.checkpoint_files import has_tokenizer_files, missing_tokenizer

    if tokenizer is not None:
        if not os.path.isdir(os.path.expanduser(tokenizer)) and looks_like_path(tokenizer):
            raise UsageError(f"--tokenizer: no such folder {tokenizer!r}; allowed: a tokenizer folder or hub id")
        return
    if ref is not None and os.path.isdir(os.path.expanduser(ref)) and not has_tokenizer_files(os.path.expanduser(ref)):
        raise UsageError(str(missing_tokenizer(ref, "--tokenizer NAME_OR_PATH")))


def check_loaded_source(model: Any) -> None:
    """The loaded model as the source of a compression (:func:`.pipeline.source_check.check_source`)."""
    from ..pipeline.source_check import check_source

    try:
        check_source(model)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
