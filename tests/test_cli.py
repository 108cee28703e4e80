"""The command line: every option of the config reachable with its default and choices in --help, one-line errors
(exit 2) before any work, the output folder, one perplexity protocol shared by `compress` and `eval`, and the
embedded default model (SmolLM2-135M-Instruct GGUF, when this machine has it)."""

import inspect
import json
import re
from pathlib import Path

import pytest

from conftest import CALIBRATION_TEXT
from optimum_sparsesched import SparseScheduleConfig
from optimum_sparsesched.config import LOADING_OPTIONS
from optimum_sparsesched.cli import main
from optimum_sparsesched.cli.options import build_parser

EVAL_LINE = "some evaluation text, a few words long\n"


def one_line_error(capsys, *needles: str) -> str:
    """The command ended with one line ``error: ...`` (progress bars of a model load may precede it), no traceback."""
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert "error:" in last and err.count("error:") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in last, err
    return last


@pytest.fixture
def texts(tmp_path):
    (tmp_path / "eval.txt").write_text(EVAL_LINE * 60)
    (tmp_path / "short.txt").write_text("too short\n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    return tmp_path


def small(*args: str) -> list[str]:
    """Options for a fast run on a tiny model (2 calibration windows of 32 tokens, 2 eval windows of 32), which
    ``args`` (the command first) may override."""
    return [args[0], "--num-samples", "2", "--seq-len", "32", "--probe-samples", "1", "--eval-seq-len", "32",
            "--eval-windows", "2", "--dataset", str(CALIBRATION_TEXT), *args[1:]]


def test_compress_help_shows_every_option_with_its_default_and_choices(capsys):
    assert main(["compress", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--sparsity SPARSITY target fraction of zeros, 0 <= s < 1 [0.5]", "{hessian,uniform,owl,ramp}",
                   "[hessian; uniform with --pattern]", "{fisher,kl-alone,obs}", "[fisher]", "{compact,dense,compressed-tensors}",
                   "[128; embedded: 16]", "[2048; embedded: 512]", "{dense,local}", "[auto]", "[lm_head]", "[0.01]", "[5.0]", "[0.08]"):
        assert needle in text, needle
    parser = build_parser()
    compress = parser._subparsers._group_actions[0].choices["compress"]
    dests = {a.dest for a in compress._actions}
    options = set(inspect.signature(SparseScheduleConfig.__init__).parameters) - {"self", "kwargs", "results",
                                                                                  "tokenizer", *LOADING_OPTIONS}
    assert options <= dests, options - dests  # every option of the config is reachable from the CLI


def test_bad_input_is_one_line_and_exit_2_before_any_work(save_tiny, texts, tmp_path, capsys):
    path = str(save_tiny("llama"))
    capsys.readouterr()
    assert main(["compress", "--sparsity", "1.5"]) == 2
    one_line_error(capsys, "sparsity")
    assert main(["compress", "--export-format", "gguf"]) == 2
    one_line_error(capsys, "export-format", "compact")
    assert main(["compress", "--reconstruct-target", "global"]) == 2
    one_line_error(capsys, "reconstruct-target", "dense", "local")
    assert main(["compress", "--max-device-memory", "lots"]) == 2
    one_line_error(capsys, "max_device_memory")
    assert main(["compress", "--sparsity-range", "low,high"]) == 2
    one_line_error(capsys, "--sparsity-range")
    assert main(["compress", str(tmp_path / "nonexistent")]) == 2
    one_line_error(capsys, "model: no such folder")
    assert main(["compress", "not a valid id!"]) == 2
    one_line_error(capsys, "neither a folder nor a valid hub id")
    assert main(["compress", "--pattern", "2:4", "OUT"]) == 2  # OUT is not taken silently for a model
    one_line_error(capsys, "'OUT'", "compress -o OUT")
    (tmp_path / "empty").mkdir()
    assert main(["compress", str(tmp_path / "empty")]) == 2
    one_line_error(capsys, "without config.json", "compress -o")
    assert main(["compress", path, "--no-eval"]) == 2  # the default calibration set, out of reach offline
    one_line_error(capsys, "--dataset: 'wikitext2' could not be loaded", "local .txt")
    assert main(small("compress", path, "--seq-len", "100000")) == 2
    one_line_error(capsys, "seq_len", "512")
    assert main(small("compress", path, "--dataset", str(texts / "binary.txt"))) == 2
    one_line_error(capsys, "--dataset", "not UTF-8")
    assert main(small("compress", path, "--eval-text", str(texts / "short.txt"))) == 2
    one_line_error(capsys, "short.txt", "fewer than seq_len=32")
    assert main(small("compress", path, "--eval-text", str(texts / "eval.txt"), "--eval-windows", "0")) == 2
    one_line_error(capsys, "max_windows")
    assert main(small("compress", path, "--eval-text", str(texts / "eval.txt"), "--eval-seq-len", "4096")) == 2
    one_line_error(capsys, "seq_len", "512 positions")
    assert main(small("compress", path, str(texts / "eval.txt"))) == 2
    one_line_error(capsys, "OUT", "is a file")
    assert main(small("compress", path, "-o", path)) == 2
    one_line_error(capsys, "OUT", "the folder the model was loaded from", "--overwrite")
    assert main(small("compress", "-o", path)) == 2  # a model folder this package did not write is never replaced
    one_line_error(capsys, "did not write")
    assert main(["eval", path, "--dataset", str(texts / "eval.txt"), "--max-windows", "0"]) == 2
    one_line_error(capsys, "max_windows")
    assert main(["eval", path, "--dataset", str(tmp_path / "missing.txt")]) == 2
    one_line_error(capsys, "--dataset", "not a file")
    assert main(["eval", path, "--dataset", str(texts / "binary.txt")]) == 2
    one_line_error(capsys, "not UTF-8")


def test_compress_saves_where_it_says_and_eval_agrees(save_tiny, texts, tmp_path, capsys):
    path = str(save_tiny("llama"))
    eval_text = str(texts / "eval.txt")
    assert main(small("compress", path, "--eval-text", eval_text)) == 0
    printed = capsys.readouterr().out
    assert "nothing was saved: add -o OUT" in printed and "(eval.txt, 2 windows × 32 tokens)" in printed
    out = tmp_path / "out"
    assert main(small("compress", path, "-o", str(out), "--eval-text", eval_text, "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["saved"] == str(out) and (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert summary["eval"] == "eval.txt, 2 windows × 32 tokens" and summary["weights"] == f"the local folder {Path(path).name}"
    if summary.get("sparsity_range"):
        assert all(len(repr(x)) <= 5 for x in summary["sparsity_range"])  # rounded
    # eval on the saved checkpoint with the same protocol gives the same figure as compress's "after"
    assert main(["eval", str(out), "--dataset", eval_text, "--seq-len", "32", "--max-windows", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["perplexity"] == pytest.approx(summary["ppl_after"], abs=1e-3)
    assert got["protocol"] == summary["eval"]
    # and eval on the original model gives compress's "before"
    assert main(["eval", path, "--dataset", eval_text, "--seq-len", "32", "--max-windows", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(summary["ppl_before"], abs=1e-3)
    # MODEL OUT positionally: the same; the card records the after-figure with its protocol
    assert main(small("compress", path, str(tmp_path / "out2"), "--eval-text", eval_text, "--no-eval")) == 0
    assert "saved to" in capsys.readouterr().out and (tmp_path / "out2" / "config.json").is_file()


def test_eval_default_protocol(save_tiny, texts, capsys):
    path = str(save_tiny("llama"))
    assert main(["eval", path, "--dataset", str(texts / "eval.txt"), "--seq-len", "32"]) == 0
    line = capsys.readouterr().out.strip()
    windows = len(EVAL_LINE * 60) // 10  # loose bound: the tiny tokenizer makes fewer tokens than characters/10
    match = re.fullmatch(r"perplexity [\d.]+ \(eval\.txt, (\d+) windows × 32 tokens\)", line)
    assert match and 1 < int(match.group(1)) < windows


def test_cli_embedded_default_model_end_to_end(tmp_path, capsys):
    from optimum_sparsesched.cli.default_model import SMOLLM2_GGUF
    from optimum_sparsesched.cli.pinned_download import cached_member

    if cached_member(SMOLLM2_GGUF) is None:
        pytest.skip("the embedded GGUF is not on this machine yet (the README's first command fetches it)")
    out = tmp_path / "smollm2"
    code = main(["compress", "-o", str(out), "--num-samples", "2", "--seq-len", "64", "--probe-samples", "1",
                 "--schedule", "uniform", "--eval-seq-len", "128", "--eval-windows", "2", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert 1 < summary["ppl_before"] < summary["ppl_after"] < 10 * summary["ppl_before"]
    assert "Q4_1" in summary["weights"] and "SmolLM2-135M-Instruct" in summary["weights"]
    assert "weights: HuggingFaceTB/SmolLM2-135M-Instruct quantized to Q4_1" in captured.err
    card = (out / "README.md").read_text()
    assert "# SmolLM2-135M-Instruct, 50% sparse" in card and "quantized to Q4_1" in card
    assert "Every decoder block is at sparsity 0.500" in card and not (out / "sparsity_schedule.png").exists()
    assert str(tmp_path) not in card and "/root" not in card and "/home" not in card


def test_compress_says_what_it_actually_saved(save_tiny, texts, tmp_path, capsys):
    """A README of the user's in OUT is kept and no card is written: the summary says so instead of claiming a card,
    on the streamed path and on the in-memory one."""
    path = save_tiny("llama")
    for k, extra in enumerate(([], ["--eval-text", str(texts / "eval.txt")])):
        out = tmp_path / f"out{k}"
        out.mkdir()
        (out / "README.md").write_text("# my notes about this folder\n")
        assert main(small("compress", str(path), str(out), "--schedule", "uniform", *extra)) == 0
        said = capsys.readouterr().out
        assert "saved to" in said and "your README.md was kept, so no model card was written" in said, said
        assert "model card README.md" not in said and (out / "README.md").read_text().startswith("# my notes")
        fresh = tmp_path / f"fresh{k}"
        assert main(small("compress", str(path), str(fresh), "--schedule", "uniform", *extra)) == 0
        assert f"saved to {fresh} (model, tokenizer and model card README.md)" in capsys.readouterr().out


def test_a_budget_too_small_is_refused_before_the_measurements(save_tiny, texts, tmp_path, capsys, monkeypatch):
    """--max-device-memory below one block's working set is refused right after the model loads: before the
    perplexity before compression (which takes long on a big model), and nothing is written to OUT."""
    import optimum_sparsesched.cli.commands as commands

    def never(*args, **kwargs):
        raise AssertionError("measured before the budget was checked")

    monkeypatch.setattr(commands, "_measure", never)
    path = save_tiny("llama")
    out = tmp_path / "out"
    assert main(small("compress", str(path), str(out), "--schedule", "uniform", "--max-device-memory", "1KB",
                      "--eval-text", str(texts / "eval.txt"))) == 2
    one_line_error(capsys, "max_device_memory", "cannot hold one decoder block's working set")
    assert not out.exists()


def test_run_compressed_on_a_model_this_package_did_not_compress_names_the_option(save_tiny, capsys):
    path = save_tiny("llama")
    for extra in ([], ["int4"]):
        assert main(["eval", str(path), "--run-compressed", *extra, "--seq-len", "16", "--max-windows", "1"]) == 2
        one_line_error(capsys, "--run-compressed:", "is not a checkpoint in this package's compact format",
                       "quant_method is None")
