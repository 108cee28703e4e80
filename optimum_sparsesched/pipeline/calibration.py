"""Calibration data: text from any source -> ``num_samples`` random token windows of ``seq_len``.

Everything goes through `datasets`: local files with ``load_dataset("text", data_files=..., sample_by="document")``
(each file one document, text kept as written), hub names with ``load_dataset`` of the usual repositories.
The documents are joined with ``"\\n\\n"``, tokenized once, and ``num_samples`` window starts are drawn uniformly
with a seeded generator (windows may overlap, as in SparseGPT's scripts). Result: a LongTensor
``[num_samples, seq_len]``.
"""

from __future__ import annotations

import codecs
import contextlib
import os
from pathlib import Path
from typing import Any

import torch

DATASET_DOCS = ("a path to a .txt file or a folder of .txt files, a list of strings, a datasets.Dataset with a "
                "'text' column, or a hub name 'wikitext2' / 'c4'")


def load_texts(dataset: Any) -> list[str]:
    """Return the calibration documents named by ``dataset`` (see ``SparseScheduleConfig.dataset``)."""
    from datasets import Dataset, load_dataset

    if isinstance(dataset, (list, tuple)):
        texts = list(dataset)
    elif isinstance(dataset, Dataset):
        if "text" not in dataset.column_names:
            raise ValueError(f"dataset: the datasets.Dataset has columns {dataset.column_names}; it needs a 'text' column")
        texts = list(dataset["text"])
    elif isinstance(dataset, (str, os.PathLike)) and os.path.exists(dataset):
        path = Path(dataset)
        files = sorted(str(p) for p in path.rglob("*.txt")) if path.is_dir() else [str(path)]
        if not files:
            raise ValueError(f"dataset: the folder {str(path)!r} holds no .txt file")
        try:
            with _quiet_datasets():  # no "Generating train split" bar for a local text file
                texts = list(load_dataset("text", data_files=files, sample_by="document", split="train")["text"])
        except Exception as exc:  # datasets hides a decode error under DatasetGenerationError: name the file
            bad = first_non_utf8(files)
            if bad is None:
                raise
            raise ValueError(f"dataset: {bad[0]!r} is not UTF-8 text ({bad[1]}); calibration files must be UTF-8 "
                             "encoded (convert it, e.g. with iconv)") from exc
    elif dataset == "wikitext2":
        texts = list(load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"])
        texts = ["".join(texts)]
    elif dataset == "c4":
        texts = list(load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                                  split="train")["text"][:20000])
    else:
        raise ValueError(f"dataset: {dataset!r} is not valid; allowed: {DATASET_DOCS}")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"dataset: {describe(dataset)} holds no text")
    return texts


def first_non_utf8(files: list[str]) -> tuple[str, str] | None:
    """The first file of ``files`` that is not valid UTF-8 and where (``(file, "byte 0xff at offset 6")``), else
    None. Reads in 1 MiB chunks with an incremental decoder."""
    for name in files:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(name, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                pending = len(decoder.getstate()[0])  # bytes of a sequence cut by the previous chunk
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:
                    return name, f"byte 0x{err.object[err.start]:02x} at offset {offset - pending + err.start}"
                offset += len(chunk)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                return name, f"a multi-byte sequence cut off at the end (offset {offset})"
    return None


@contextlib.contextmanager
def _quiet_datasets():
    """Turn off `datasets`' progress bars (its own switch) while a local file loads; restore them after."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def describe(dataset: Any) -> str:
    return repr(dataset) if isinstance(dataset, str) else f"<{type(dataset).__name__}>"


def tokenize_corpus(texts: list[str], tokenizer: Any) -> torch.Tensor:
    """Join the documents with blank lines and tokenize once -> LongTensor ``[n_tokens]``."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids
    return ids[0].long()


def sample_windows(token_ids: torch.Tensor, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """Draw ``num_samples`` windows of ``seq_len`` consecutive tokens -> LongTensor ``[num_samples, seq_len]``."""
    n = int(token_ids.numel())
    if n < seq_len:
        raise ValueError(f"dataset: the calibration text has {n} tokens, fewer than seq_len={seq_len} needed for one "
                         f"window; give more text or a smaller seq_len")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([token_ids[s: s + seq_len] for s in starts.tolist()])


def calibration_windows(dataset: Any, tokenizer: Any, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``dataset`` -> LongTensor ``[num_samples, seq_len]`` of calibration token windows."""
    return sample_windows(tokenize_corpus(load_texts(dataset), tokenizer), num_samples, seq_len, seed)


def check_token_ids(windows: torch.Tensor, model: Any) -> None:
    """Refuse, before any model work, calibration windows holding token ids the model has no embedding for (a
    tokenizer of another model)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None) or getattr(getattr(embeddings, "weight", None), "shape", [0])[0]
    top = int(windows.max()) if windows.numel() else 0
    if rows and top >= rows:
        raise ValueError(f"tokenizer: it produced token id {top} on the calibration text, but the model's input "
                         f"embeddings have {rows} rows (ids 0..{rows - 1}); use the model's own tokenizer (tokenizer=None "
                         "loads it from the model's path)")


def resolve_tokenizer(config: Any, tokenizer: Any, model: Any) -> Any:
    """The tokenizer object: the argument, else ``config.tokenizer`` (object or name), else the model's path."""
    tok = tokenizer if tokenizer is not None else config.tokenizer
    if isinstance(tok, os.PathLike):
        tok = os.fspath(tok)
    if tok is not None and not isinstance(tok, str) and not callable(tok):
        raise ValueError(f"tokenizer: a {type(tok).__name__} ({tok!r:.40}) is not a tokenizer; allowed: None (the "
                         "model's own), a tokenizer object (callable on text), or a model name/path")
    if tok is None:
        tok = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        if not tok:
            raise ValueError("tokenizer: the model has no name_or_path; pass tokenizer= (an object or a name/path)")
    if isinstance(tok, str):
        from transformers import AutoTokenizer

        from .checkpoint_files import has_tokenizer_files, missing_tokenizer

        if tokenizer is None and config.tokenizer is None and os.path.isdir(tok) and not has_tokenizer_files(tok):
            raise missing_tokenizer(tok, "tokenizer= (compress(model, config, tokenizer=...), "
                                         "SparseScheduleConfig(tokenizer=...) or compress_checkpoint(..., tokenizer=...))")
        try:
            tok = AutoTokenizer.from_pretrained(tok)
        except (OSError, ValueError) as exc:
            raise ValueError(f"tokenizer: could not load a tokenizer from {tok!r}: {exc}") from exc
    return tok
