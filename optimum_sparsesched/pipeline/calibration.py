"""Calibration data: a text source (:class:`CalibrationSource`) -> ``num_samples`` random token windows of
``seq_len``.

:class:`CalibrationSource` is the one place that decides what a ``dataset`` is — a local UTF-8 ``.txt`` file or a
folder of them, a list of strings, a ``datasets.Dataset`` with a ``"text"`` column, or a hub name (``"wikitext2"``,
``"c4"``) — how ``config.json`` describes it without a local path (a file by its name and SHA-256), how its files
are checked (:func:`check_text_file`: UTF-8, with text) and how its documents are loaded. Everything is read
through `datasets`: local files with ``load_dataset("text", data_files=..., sample_by="document")`` (each file one
document, text kept as written), hub names with ``load_dataset`` of the usual repositories. The documents are
joined with ``"\\n\\n"``, tokenized once, and ``num_samples`` window starts are drawn uniformly with a seeded
generator (windows may overlap, as in SparseGPT's scripts). Result: a LongTensor ``[num_samples, seq_len]``.
"""

from __future__ import annotations

import codecs
import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from .digest import files_sha256

HUB_DATASETS = ("wikitext2", "c4")
DATASET_DOCS = ("a path to a .txt file or a folder of .txt files, a list of strings, a datasets.Dataset with a "
                "'text' column, or a hub name 'wikitext2' / 'c4'")


def _invalid(value: Any, allowed: str) -> ValueError:
    return ValueError(f"SparseScheduleConfig: `dataset`={value!r} is not valid; allowed: {allowed}.")


def check_text_file(path: str | os.PathLike, option: str) -> int:
    """Decode ``path`` as UTF-8 in 1 MiB chunks; returns its number of non-blank characters. A ``ValueError`` naming
    ``option`` and the file when it cannot be read or is not UTF-8 (``byte 0xe9 at offset 3``)."""
    path = Path(path)
    decoder, offset, content = codecs.getincrementaldecoder("utf-8")(), 0, 0
    try:
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                pending = len(decoder.getstate()[0])  # bytes of a sequence cut by the previous chunk
                try:
                    content += len(decoder.decode(chunk).strip())
                except UnicodeDecodeError as err:
                    where = f"byte 0x{err.object[err.start]:02x} at offset {offset - pending + err.start}"
                    raise ValueError(f"{option}: {path.name!r} is not UTF-8 text ({where}); text files must be "
                                     "UTF-8 encoded (convert it, e.g. with iconv)") from None
                offset += len(chunk)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise ValueError(f"{option}: {path.name!r} is not UTF-8 text (a multi-byte sequence cut off at the "
                                 f"end, offset {offset})") from None
    except OSError as exc:
        raise ValueError(f"{option}: {path.name!r} cannot be read ({exc.strerror or exc})") from None
    return content


def is_local_path(name: str) -> bool:
    """Whether a model/tokenizer name is a path on this machine rather than a hub id (``name`` or ``owner/name``)."""
    return (os.path.isabs(name) or os.path.exists(name) or name.startswith(("./", "../", "~")) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def describe_tokenizer(tokenizer: Any) -> str:
    """What config.json records of ``tokenizer``: a hub id as given, a local path by its folder name only
    (``"<local smollm2-135m>"``), an object by its ``name_or_path`` treated the same way (else its class name)."""
    name = tokenizer if isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", None)
    if not isinstance(name, str) or not name:
        return type(tokenizer).__name__
    return f"<local {Path(name.rstrip('/')).name}>" if is_local_path(name) else name


class CalibrationSource:
    """A calibration ``dataset`` as given (a ``pathlib.Path`` is kept as its string)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = os.fspath(dataset) if isinstance(dataset, os.PathLike) else dataset

    @staticmethod
    def is_record(value: Any) -> bool:
        """Whether ``value``, read from a saved ``config.json``, is a hub name or a description written by
        :meth:`describe` (it names no data on this machine)."""
        return isinstance(value, str) and (value in HUB_DATASETS or (value.startswith("<") and value.endswith(">")))

    def check(self) -> "CalibrationSource":
        """Refuse (``ValueError`` naming ``dataset`` and what is allowed) anything that is not a dataset."""
        ds = self.dataset
        if isinstance(ds, str):
            if ds in HUB_DATASETS or os.path.exists(ds):
                return self
            raise _invalid(ds, f"a path (str or pathlib.Path) to an existing .txt file or folder, one of "
                           f"{HUB_DATASETS}, a list of strings, or a datasets.Dataset with a 'text' column")
        if isinstance(ds, (list, tuple)):
            if not ds or not all(isinstance(t, str) for t in ds):
                raise _invalid(f"<list of {len(ds)} items>", "a non-empty list of strings")
            return self
        column_names = getattr(ds, "column_names", None)
        if column_names is not None:
            if "text" not in column_names:
                raise _invalid(f"<Dataset with columns {column_names}>", "a datasets.Dataset with a 'text' column")
            return self
        raise _invalid(type(ds).__name__, "str path, hub name, list[str] or datasets.Dataset")

    def files(self) -> list[Path] | None:
        """The local ``.txt`` files of a path dataset (a folder's, sorted, searched recursively), else ``None``."""
        if not isinstance(self.dataset, str) or not os.path.exists(self.dataset):
            return None
        path = Path(self.dataset)
        return sorted(path.rglob("*.txt")) if path.is_dir() else [path]

    def describe(self) -> str:
        """What config.json records, never a local path: a hub name as given; a local ``.txt`` file as ``"<file NAME
        sha256:HEX>"`` and a folder as ``"<folder NAME: N .txt files sha256:HEX>"`` (HEX: SHA-256 of the files'
        names and bytes, so the data is identified without saying where it lives); a description saved earlier is
        kept; a path that no longer exists keeps its file name only; in-memory data is described by its size."""
        ds, files = self.dataset, self.files()
        if self.is_record(ds):
            return ds
        if files is not None:
            path = Path(ds)
            if path.is_file():
                return f"<file {path.name} sha256:{files_sha256(files, path.parent)}>"
            return f"<folder {path.resolve().name}: {len(files)} .txt files sha256:{files_sha256(files, path)}>"
        if isinstance(ds, str):
            return f"<file {Path(ds).name}>"
        return f"<{type(ds).__name__} of {len(ds)} texts>" if hasattr(ds, "__len__") else "<in-memory>"

    def check_readable(self, option: str = "dataset") -> None:
        """Before any model work: every local file is UTF-8 and one holds text; a hub dataset loads now (the Hub
        may be out of reach). A ``ValueError`` naming ``option``."""
        files = self.files()
        if files is None:
            if isinstance(self.dataset, str):
                try:
                    self.texts()
                except Exception as exc:  # datasets' many ways to say "not reachable / not cached"
                    reason = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                    raise ValueError(f"{option}: {self.dataset!r} could not be loaded ({type(exc).__name__}: "
                                     f"{reason[:160]}); pass a local .txt file or folder") from None
            return
        if not files:
            raise ValueError(f"{option}: the folder {Path(self.dataset).name!r} holds no .txt file")
        if not sum(check_text_file(f, option) for f in files):
            raise ValueError(f"{option}: {Path(self.dataset).name!r} holds no text")

    def texts(self) -> list[str]:
        """The calibration documents (empty ones dropped); ``ValueError`` naming ``dataset`` when there are none or
        a file is not UTF-8."""
        from datasets import Dataset, load_dataset

        ds, files = self.dataset, self.files()
        if isinstance(ds, (list, tuple)):
            texts = list(ds)
        elif isinstance(ds, Dataset):
            if "text" not in ds.column_names:
                raise ValueError(f"dataset: the datasets.Dataset has columns {ds.column_names}; it needs a 'text' "
                                 "column")
            texts = list(ds["text"])
        elif files is not None:
            if not files:
                raise ValueError(f"dataset: the folder {ds!r} holds no .txt file")
            try:
                with _quiet_datasets():  # no "Generating train split" bar for a local text file
                    texts = list(load_dataset("text", data_files=[str(f) for f in files], sample_by="document",
                                              split="train")["text"])
            except Exception:  # datasets hides a decode error under DatasetGenerationError: name the file
                for f in files:
                    check_text_file(f, "dataset")
                raise
        elif ds == "wikitext2":
            texts = ["".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"])]
        elif ds == "c4":
            texts = list(load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                                      split="train")["text"][:20000])
        else:
            raise ValueError(f"dataset: {ds!r} is not valid; allowed: {DATASET_DOCS}")
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            raise ValueError(f"dataset: {ds!r} holds no text" if isinstance(ds, str)
                             else f"dataset: <{type(ds).__name__}> holds no text")
        return texts


def load_texts(dataset: Any) -> list[str]:
    """The calibration documents of ``dataset`` (see :class:`CalibrationSource`)."""
    return CalibrationSource(dataset).texts()


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


def resolve_tokenizer(option: Any, tokenizer: Any, model: Any) -> Any:
    """The tokenizer object: the argument ``tokenizer``, else the ``tokenizer`` option (object or name), else the
    model's path."""
    tok = tokenizer if tokenizer is not None else option
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

        if tokenizer is None and option is None and os.path.isdir(tok) and not has_tokenizer_files(tok):
            raise missing_tokenizer(tok, "tokenizer= (compress(model, config, tokenizer=...), "
                                         "SparseScheduleConfig(tokenizer=...) or compress_checkpoint(..., tokenizer=...))")
        try:
            tok = AutoTokenizer.from_pretrained(tok)
        except (OSError, ValueError) as exc:
            raise ValueError(f"tokenizer: could not load a tokenizer from {tok!r}: {exc}") from exc
    return tok
