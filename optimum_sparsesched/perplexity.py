"""Perplexity with the SparseGPT protocol.

Text: the lines of a file (each keeping its newline) or a list of texts, joined with ``"\\n\\n"`` — what
SparseGPT's scripts do with the rows of the HF WikiText-2 test split — tokenized once and cut into consecutive
non-overlapping windows of ``seq_len`` tokens (the remainder is dropped). Perplexity
``= exp(mean next-token cross-entropy over all windows)``, the loss computed in float32.
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


def eval_windows(token_ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """``[n_tokens]`` -> ``[n_windows, seq_len]`` consecutive windows (at most ``max_windows``)."""
    n = token_ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"texts_or_path: the text has {token_ids.numel()} tokens, fewer than seq_len={seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return token_ids[: n * seq_len].view(n, seq_len)


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, texts_or_path: str | os.PathLike | Sequence[str],
               seq_len: int = 2048, max_windows: int | None = None) -> float:
    """Perplexity of ``model`` on the text, with non-overlapping windows of ``seq_len`` tokens."""
    text = read_eval_text(texts_or_path)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    windows = eval_windows(ids, seq_len, max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for row in windows:
        x = row.unsqueeze(0).to(device)
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        loss = nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
        total += loss.item()
        count += x.shape[1] - 1
    if was_training:
        model.train()
    return math.exp(total / count)
