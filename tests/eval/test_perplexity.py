"""Perplexity protocol (non-overlapping and strided windows) and the `evaluate` metric."""

import math

import pytest
import torch

from conftest import tiny_model
from optimum_sparsesched import perplexity
from optimum_sparsesched.eval.perplexity import eval_spans, perplexity_report, read_eval_text, text_perplexities


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
    with pytest.raises(ValueError, match="seq_len: 4096 is longer than the model's 512 positions"):
        perplexity(model, tokenizer, ["short"], seq_len=4096)
    with pytest.raises(ValueError, match="fewer than seq_len=256"):
        perplexity(model, tokenizer, ["short"], seq_len=256)
    for bad in (dict(max_windows=0), dict(seq_len=0), dict(stride=-1), dict(max_windows=1.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            perplexity(model, tokenizer, path, **{"seq_len": 32, **bad})
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="'binary.txt' is not UTF-8"):
        perplexity(model, tokenizer, tmp_path / "binary.txt", seq_len=32)


def test_the_report_names_its_protocol_and_the_default_is_2048_or_the_models_positions(tokenizer, tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("a few words of text, repeated.\n" * 300)
    model = tiny_model("llama", max_position_embeddings=128)
    report = perplexity_report(model, tokenizer, path, max_windows=3)
    assert (report.seq_len, report.windows, report.text) == (128, 3, "eval.txt")  # min(2048, the model's 128)
    assert str(report) == f"{report.value:.2f} (eval.txt, 3 windows × 128 tokens)"
    assert report.value == perplexity(model, tokenizer, path, seq_len=128, max_windows=3)
    strided = perplexity_report(model, tokenizer, ["x y z " * 200], seq_len=64, stride=32, max_windows=1)
    assert strided.protocol == "<1 texts>, 1 window × 64 tokens, stride 32"


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


def by_hand(model, tokenizer, text: str, max_length: int | None = None) -> float:
    """The Hub `perplexity` metric's definition: BOS + the text's tokens (the first ``max_length``),
    exp(mean next-token cross-entropy)."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([([start] + tokenizer(text).input_ids)[:max_length]])
    with torch.no_grad():
        return math.exp(model(input_ids=ids, labels=ids).loss.item())


def test_evaluate_metric_follows_the_hub_perplexity_conventions(tokenizer, save_tiny):
    import evaluate

    import optimum_sparsesched

    texts = ["a short text", "another one, a bit longer than the first one", "x"]
    model = tiny_model("llama")
    metric = evaluate.load(optimum_sparsesched.PERPLEXITY_METRIC)
    got = metric.compute(predictions=texts, model=model, tokenizer=tokenizer)  # shorter than any window: fine
    assert set(got) == {"perplexities", "mean_perplexity"} and len(got["perplexities"]) == 3
    assert got["perplexities"] == pytest.approx([by_hand(model, tokenizer, t) for t in texts], rel=1e-4)
    assert got["mean_perplexity"] == pytest.approx(sum(got["perplexities"]) / 3)
    one_by_one = metric.compute(predictions=texts, model=model, tokenizer=tokenizer, batch_size=1)
    assert one_by_one["perplexities"] == pytest.approx(got["perplexities"], rel=1e-4)  # batching changes nothing
    no_start = text_perplexities(model, tokenizer, texts[:2], add_start_token=False)
    assert no_start[0] != pytest.approx(got["perplexities"][0])
    truncated = text_perplexities(model, tokenizer, [texts[1]], max_length=4)[0]
    assert truncated == pytest.approx(by_hand(model, tokenizer, texts[1], max_length=4), rel=1e-4)
    path = save_tiny("llama")  # same weights (seed 0), loaded from a folder by the metric itself
    by_path = metric.compute(predictions=texts, model=str(path))
    assert by_path["perplexities"] == pytest.approx(got["perplexities"], rel=1e-4)
    for bad, name in ((dict(protocol="windows"), "protocol"), (dict(batch_size=0), "batch_size"),
                      (dict(predictions=[]), "predictions")):
        with pytest.raises(ValueError, match=name):
            metric.compute(**{"predictions": texts, "model": model, "tokenizer": tokenizer, **bad})


def test_evaluate_metric_keeps_the_sparsegpt_protocol(tokenizer, save_tiny):
    import evaluate

    import optimum_sparsesched

    texts = ["first line of text", "second line, a bit longer than the first"] * 30
    model = tiny_model("llama")
    metric = evaluate.load(optimum_sparsesched.PERPLEXITY_METRIC)
    got = metric.compute(predictions=texts, model=model, tokenizer=tokenizer, protocol="sparsegpt", seq_len=32)
    assert got["perplexity"] == pytest.approx(perplexity(model, tokenizer, texts, seq_len=32), rel=1e-6)
    assert got["num_windows"] >= 2 and got["seq_len"] == 32
    strided = metric.compute(predictions=texts, model=model, tokenizer=tokenizer, protocol="sparsegpt", seq_len=32,
                             stride=16)
    assert strided["perplexity"] == pytest.approx(perplexity(model, tokenizer, texts, seq_len=32, stride=16))
    default = metric.compute(predictions=texts * 20, model=model, tokenizer=tokenizer, protocol="sparsegpt")
    assert default["seq_len"] == 512  # min(2048, the tiny model's 512 positions), as everywhere
    path = save_tiny("llama")
    by_path = metric.compute(predictions=texts, model=str(path), protocol="sparsegpt", seq_len=32)
    assert by_path["perplexity"] == pytest.approx(got["perplexity"], rel=1e-5)


def test_the_metric_says_how_many_tokens_a_long_text_loses(tokenizer):
    """The per-text protocol scores the first ``max_length`` tokens of each text (as the Hub metric); a warning
    says which texts were cut and how many tokens were dropped."""
    import evaluate

    import optimum_sparsesched

    model = tiny_model("llama")
    long_text = "many words in a long text " * 40
    n = len(tokenizer(long_text, add_special_tokens=False).input_ids) + 1  # with the start token
    metric = evaluate.load(optimum_sparsesched.PERPLEXITY_METRIC)
    with pytest.warns(UserWarning, match=rf"max_length: 1 of 2 texts are longer than max_length=16 tokens; only "
                                         rf"their first 16 tokens are scored and {n - 16} tokens are dropped "
                                         rf"\(predictions\[1\] {n - 16}\)"):
        metric.compute(predictions=["short", long_text], model=model, tokenizer=tokenizer, max_length=16)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing cut, nothing said
        metric.compute(predictions=["short", "also short"], model=model, tokenizer=tokenizer, max_length=16)


def test_a_stride_longer_than_the_window_is_refused(tokenizer, save_tiny, capsys):
    """``stride > seq_len`` was clamped to non-overlapping windows without a word: refused, naming ``stride`` and
    the allowed range, in the Python API, the metric and the CLI."""
    import evaluate

    import optimum_sparsesched
    from optimum_sparsesched.cli import main

    model = tiny_model("llama")
    texts = ["first line of text", "second line, a bit longer than the first"] * 30
    with pytest.raises(ValueError, match=r"stride: 64 is larger than seq_len=32; allowed: 1\.\.32"):
        perplexity(model, tokenizer, texts, seq_len=32, stride=64)
    with pytest.raises(ValueError, match=r"stride: 64 is larger than seq_len=32"):
        eval_spans(1000, 32, stride=64)
    metric = evaluate.load(optimum_sparsesched.PERPLEXITY_METRIC)
    with pytest.raises(ValueError, match="stride: 64"):
        metric.compute(predictions=texts, model=model, tokenizer=tokenizer, protocol="sparsegpt", seq_len=32, stride=64)
    assert perplexity(model, tokenizer, texts, seq_len=32, stride=32) == perplexity(model, tokenizer, texts, seq_len=32)
    path = save_tiny("llama")
    capsys.readouterr()
    assert main(["eval", str(path), "--seq-len", "32", "--stride", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: stride: 64 is larger than seq_len=32; allowed: 1..32"), err
