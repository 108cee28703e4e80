"""Perplexity with the SparseGPT protocol (and strided windows): the one protocol every entry point uses.

Text: the lines of a file (each keeping its newline) or a list of texts, joined with ``"\\n\\n"`` — what
SparseGPT's scripts do with the rows of the HF WikiText-2 test split — tokenized once.

- Non-overlapping (default): consecutive windows of ``seq_len`` tokens (the remainder is dropped); every window
  scores its ``seq_len - 1`` next-token predictions.
- Strided (``stride < seq_len``): windows of ``seq_len`` start every ``stride`` tokens; each scores only the
  tokens not scored by the previous window, so every token after the first is scored once with up to
  ``seq_len - stride`` tokens of context (the transformers "perplexity of fixed-length models" recipe).

Perplexity ``= exp(Σ next-token cross-entropy / number of scored tokens)``, the loss in float32.

Defaults, the same for ``compress`` (before/after), ``eval``, :func:`perplexity` and the ``evaluate`` metric's
``protocol="sparsegpt"``: ``seq_len`` = :data:`DEFAULT_SEQ_LEN` (or the model's positions when fewer), every window
(``max_windows=None``), no stride. :class:`PerplexityReport` prints the figure with its protocol.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..pipeline.calibration import check_text_file

DEFAULT_SEQ_LEN = 2048


def read_eval_text(texts_or_path: str | os.PathLike | Sequence[str]) -> str:
    """A path -> its lines (newlines kept) joined with blank lines; a list of texts -> joined with blank lines;
    any other string is the text itself. A file that is not UTF-8 text is a ``ValueError`` naming it."""
    if isinstance(texts_or_path, (str, os.PathLike)) and os.path.isfile(texts_or_path):
        check_text_file(texts_or_path, "texts_or_path")
        with open(texts_or_path, encoding="utf-8") as f:
            return "\n\n".join(f.readlines())
    if isinstance(texts_or_path, os.PathLike):
        raise ValueError(f"texts_or_path: {os.fspath(texts_or_path)!r} is not a file")
    if isinstance(texts_or_path, str):
        return texts_or_path
    return "\n\n".join(texts_or_path)


def text_name(texts_or_path: Any) -> str:
    """How a report names the text: a file's name (never its folder), else ``"<N texts>"``/``"<text>"``."""
    if isinstance(texts_or_path, (str, os.PathLike)) and os.path.isfile(texts_or_path):
        return Path(texts_or_path).name
    if isinstance(texts_or_path, str):
        return "<text>"
    return f"<{len(texts_or_path)} texts>"


def max_positions(model: nn.Module) -> int | None:
    """The longest input the model's position embeddings allow (``max_position_embeddings``/``n_positions``), or
    None when its config names none (ALiBi, ...)."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def default_seq_len(model: nn.Module) -> int:
    """:data:`DEFAULT_SEQ_LEN`, or the model's positions when fewer."""
    limit = max_positions(model)
    return min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN


def check_protocol(model: nn.Module, seq_len: int, stride: int | None, max_windows: int | None) -> None:
    """``ValueError`` naming the option for a window length, stride or window count that cannot be evaluated."""
    for name, value in (("seq_len", seq_len), ("stride", stride), ("max_windows", max_windows)):
        if value is None and name != "seq_len":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: {value!r} is not valid; allowed: "
                             f"{'' if name == 'seq_len' else 'None or '}a positive integer")
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len: {seq_len} is longer than the model's {limit} positions; allowed: 1..{limit}")
    if stride is not None and stride > seq_len:
        raise ValueError(f"stride: {stride} is larger than seq_len={seq_len}; allowed: 1..{seq_len} (windows start "
                         f"every stride tokens; stride = seq_len, or None, gives non-overlapping windows)")


def eval_spans(n_tokens: int, seq_len: int, stride: int | None = None,
               max_windows: int | None = None) -> list[tuple[int, int, int]]:
    """Windows as ``(begin, end, first_scored)``: tokens ``[begin, end)`` are fed, predictions of positions
    ``>= first_scored`` are scored."""
    if n_tokens < seq_len:
        raise ValueError(f"texts_or_path: the text has {n_tokens} tokens, fewer than seq_len={seq_len} for one "
                         f"window; give more text or a smaller seq_len")
    if stride is not None and stride > seq_len:
        raise ValueError(f"stride: {stride} is larger than seq_len={seq_len}; allowed: 1..{seq_len}")
    if stride is None or stride == seq_len:
        spans = [(b, b + seq_len, b + 1) for b in range(0, n_tokens - seq_len + 1, seq_len)]
    else:
        spans, scored_until = [], 1
        for b in range(0, n_tokens - 1, stride):
            e = min(b + seq_len, n_tokens)
            spans.append((b, e, max(scored_until, b + 1)))
            scored_until = e
            if e == n_tokens:
                break
    return spans[:max_windows] if max_windows is not None else spans


@dataclass(frozen=True)
class PerplexityReport:
    """A perplexity and the protocol that produced it; ``str()`` gives ``"57.30 (evaluation.txt, 8 windows × 512
    tokens)"``."""

    value: float
    text: str
    windows: int
    seq_len: int
    stride: int | None = None
    scored_tokens: int = 0

    @property
    def protocol(self) -> str:
        stride = f", stride {self.stride}" if self.stride is not None and self.stride < self.seq_len else ""
        return f"{self.text}, {self.windows} window{'s' * (self.windows != 1)} × {self.seq_len} tokens{stride}"

    def __str__(self) -> str:
        return f"{self.value:.2f} ({self.protocol})"


@torch.no_grad()
def perplexity_report(model: nn.Module, tokenizer: Any, texts_or_path: str | os.PathLike | Sequence[str],
                      seq_len: int | None = None, max_windows: int | None = None,
                      stride: int | None = None) -> PerplexityReport:
    """Perplexity of ``model`` on the text with its protocol: non-overlapping windows of ``seq_len`` tokens
    (default :func:`default_seq_len`), or strided windows when ``stride < seq_len``; at most ``max_windows``."""
    seq_len = default_seq_len(model) if seq_len is None else seq_len
    check_protocol(model, seq_len, stride, max_windows)
    text = read_eval_text(texts_or_path)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    spans = eval_spans(ids.numel(), seq_len, stride, max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for begin, end, first in spans:
            x = ids[begin:end].unsqueeze(0).to(device)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            targets = x[0, 1:]
            keep = slice(first - begin - 1, None)
            total += nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            count += targets[keep].numel()
    finally:
        if was_training:
            model.train()
    return PerplexityReport(math.exp(total / count), text_name(texts_or_path), len(spans), seq_len, stride, count)


def perplexity(model: nn.Module, tokenizer: Any, texts_or_path: str | os.PathLike | Sequence[str],
               seq_len: int | None = None, max_windows: int | None = None, stride: int | None = None) -> float:
    """:func:`perplexity_report`'s value."""
    return perplexity_report(model, tokenizer, texts_or_path, seq_len, max_windows, stride).value


def warn_truncated(lengths: Sequence[int], limit: int) -> None:
    """Warn (``UserWarning``) when texts of ``lengths`` tokens are longer than ``limit``: only their first
    ``limit`` tokens are scored, as the Hub ``perplexity`` metric truncates them; says how many tokens are dropped."""
    over = {k: n - limit for k, n in enumerate(lengths) if n > limit}
    if over:
        shown = ", ".join(f"predictions[{k}] {d}" for k, d in list(over.items())[:5]) + ", ..." * (len(over) > 5)
        warnings.warn(f"max_length: {len(over)} of {len(lengths)} texts are longer than max_length={limit} tokens; "
                      f"only their first {limit} tokens are scored and {sum(over.values())} tokens are dropped "
                      f"({shown}). Pass a larger max_length (up to the model's positions), split the texts, or use "
                      "protocol='sparsegpt', which scores every window of a long text", UserWarning, stacklevel=3)


@torch.no_grad()
def text_perplexities(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 16,
                      add_start_token: bool = True, max_length: int | None = None) -> list[float]:
    """One perplexity per text, each text scored on its own (the Hub ``perplexity`` metric's convention): its
    tokens (after a BOS token with ``add_start_token``; the first ``max_length``, default the model's positions)
    predicted left to right, ``exp(mean cross-entropy)``. Texts are batched ``batch_size`` at a time, right-padded
    under an attention mask, so the result does not depend on the batching."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size: {batch_size!r} is not valid; allowed: a positive integer")
    limit = max_length or max_positions(model) or DEFAULT_SEQ_LEN
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if add_start_token and start is None:
        raise ValueError("add_start_token: the tokenizer has no BOS (or EOS) token; pass add_start_token=False")
    sequences = []
    for k, text in enumerate(texts):
        ids = ([start] if add_start_token else []) + tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) < 2:
            raise ValueError(f"predictions[{k}]: {text!r} has too few tokens to score (needs 2 with the start token"
                             f"{'' if add_start_token else '; add_start_token=False'})")
        sequences.append(ids)
    warn_truncated([len(s) for s in sequences], limit)
    sequences = [s[:limit] for s in sequences]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for b in range(0, len(sequences), batch_size):
            batch = sequences[b: b + batch_size]
            width = max(len(s) for s in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, s in enumerate(batch):
                ids[row, : len(s)] = torch.tensor(s)
                mask[row, : len(s)] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            nll = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            scored = mask[:, 1:].float()
            out += torch.exp((nll * scored).sum(1) / scored.sum(1)).tolist()
    finally:
        if was_training:
            model.train()
    return out
