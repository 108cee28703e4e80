"""Perplexity with the SparseGPT protocol (and strided windows).

Text: the lines of a file (each keeping its newline) or a list of texts, joined with ``"\\n\\n"`` — what
SparseGPT's scripts do with the rows of the HF WikiText-2 test split — tokenized once.

- Non-overlapping (default): consecutive windows of ``seq_len`` tokens (the remainder is dropped); every window
  scores its ``seq_len - 1`` next-token predictions.
- Strided (``stride < seq_len``): windows of ``seq_len`` start every ``stride`` tokens; each scores only the
  tokens not scored by the previous window, so every token after the first is scored once with up to
  ``seq_len - stride`` tokens of context (the transformers "perplexity of fixed-length models" recipe).

Perplexity ``= exp(Σ next-token cross-entropy / number of scored tokens)``, the loss in float32.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch
from torch import nn


def read_eval_text(texts_or_path: str | os.PathLike | Sequence[str]) -> str:
    """A path -> its lines (newlines kept) joined with blank lines; a list of texts -> joined with blank lines;
    any other string is the text itself."""
    if isinstance(texts_or_path, (str, os.PathLike)) and os.path.isfile(texts_or_path):
        with open(texts_or_path, encoding="utf-8") as f:
            return "\n\n".join(f.readlines())
    if isinstance(texts_or_path, str):
        return texts_or_path
    return "\n\n".join(texts_or_path)


def eval_spans(n_tokens: int, seq_len: int, stride: int | None = None,
               max_windows: int | None = None) -> list[tuple[int, int, int]]:
    """Windows as ``(begin, end, first_scored)``: tokens ``[begin, end)`` are fed, predictions of positions
    ``>= first_scored`` are scored."""
    if n_tokens < seq_len:
        raise ValueError(f"texts_or_path: the text has {n_tokens} tokens, fewer than seq_len={seq_len}")
    if stride is None or stride >= seq_len:
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


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, texts_or_path: str | os.PathLike | Sequence[str],
               seq_len: int = 2048, max_windows: int | None = None, stride: int | None = None) -> float:
    """Perplexity of ``model`` on the text: non-overlapping windows of ``seq_len`` tokens, or strided windows
    when ``stride < seq_len``; at most ``max_windows`` windows."""
    if stride is not None and stride <= 0:
        raise ValueError(f"stride: {stride} is not valid; allowed: None or 1..seq_len")
    text = read_eval_text(texts_or_path)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for begin, end, first in eval_spans(ids.numel(), seq_len, stride, max_windows):
        x = ids[begin:end].unsqueeze(0).to(device)
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        targets = x[0, 1:]
        keep = slice(first - begin - 1, None)
        total += nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
        count += targets[keep].numel()
    if was_training:
        model.train()
    return math.exp(total / count)
