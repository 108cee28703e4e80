"""Perplexity protocol (non-overlapping and strided windows) and the `evaluate` metric."""

import math

import pytest
import torch

from conftest import tiny_model
from optimum_sparsesched import perplexity
from optimum_sparsesched.eval.perplexity import eval_spans, read_eval_text


def test_perplexity_matches_the_model_loss(tokenizer, tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "eval.txt"
    path.write_text("first line of text\nsecond line, a bit longer than the first\n" * 40)
    text = read_eval_text(path)
    assert text.startswith("first line of text\n\n\nsecond")  # lines keep their newline, joined with blank lines
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    windows = ids[: (ids.numel() // 32) * 32].view(-1, 32)
    with torch.no_grad():
        losses = [model(input_ids=w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item() for w in windows]
    assert perplexity(model, tokenizer, path, seq_len=32) == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert perplexity(model, tokenizer, path, seq_len=32, max_windows=2) == pytest.approx(
        math.exp(sum(losses[:2]) / 2), rel=1e-5)
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(model, tokenizer, ["short"], seq_len=4096)


def test_strided_perplexity_scores_every_token_once(tokenizer):
    spans = eval_spans(100, 32, stride=16)
    scored = [t for b, e, first in spans for t in range(first, e)]
    assert scored == list(range(1, 100))  # every token after the first, once
    model = tiny_model("llama")
    text = "a few words of text, repeated. " * 60
    strided = perplexity(model, tokenizer, text, seq_len=32, stride=8)
    plain = perplexity(model, tokenizer, text, seq_len=32)
    assert math.isfinite(strided) and strided != plain
    assert perplexity(model, tokenizer, text, seq_len=32, stride=32) == pytest.approx(plain)


def test_evaluate_metric_matches_the_function_offline(tokenizer, save_tiny):
    import evaluate

    import optimum_sparsesched

    texts = ["first line of text", "second line, a bit longer than the first"] * 30
    model = tiny_model("llama")
    metric = evaluate.load(optimum_sparsesched.PERPLEXITY_METRIC)
    got = metric.compute(predictions=texts, model=model, tokenizer=tokenizer, seq_len=32)
    assert got["perplexity"] == pytest.approx(perplexity(model, tokenizer, texts, seq_len=32), rel=1e-6)
    assert got["num_windows"] >= 2
    path = save_tiny("llama")  # same weights (seed 0), loaded from a folder by the metric itself
    by_path = metric.compute(predictions=texts, model=str(path), seq_len=32)
    assert by_path["perplexity"] == pytest.approx(got["perplexity"], rel=1e-5)
