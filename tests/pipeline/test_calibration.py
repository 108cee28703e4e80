"""Calibration data: text sources, seeded token windows."""

import datasets
import pytest
import torch

from conftest import CALIBRATION_TEXT
from optimum_sparsesched.pipeline.calibration import calibration_windows, load_texts, sample_windows


def test_windows_are_seeded_and_in_range(tokenizer):
    a = calibration_windows(str(CALIBRATION_TEXT), tokenizer, 8, 32, seed=1)
    b = calibration_windows(str(CALIBRATION_TEXT), tokenizer, 8, 32, seed=1)
    c = calibration_windows(str(CALIBRATION_TEXT), tokenizer, 8, 32, seed=2)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_windows_come_from_the_text():
    ids = torch.arange(100)
    w = sample_windows(ids, 5, 10, seed=0)
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 10)) for row in w)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        sample_windows(ids, 1, 101, seed=0)


def test_dataset_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta\n\ngamma\n")
    (tmp_path / "b.txt").write_text("delta\n")
    assert load_texts(str(tmp_path / "a.txt")) == ["alpha beta\n\ngamma\n"]
    assert sorted(load_texts(str(tmp_path))) == ["alpha beta\n\ngamma\n", "delta\n"]
    assert load_texts(["x", "", "y"]) == ["x", "y"]
    assert load_texts(datasets.Dataset.from_dict({"text": ["p", "q"]})) == ["p", "q"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        load_texts(str(tmp_path / "empty"))


@pytest.fixture
def no_model_work(monkeypatch):
    """Fail the test if the model is run (errors about the data must come before)."""
    import optimum_sparsesched.sequential as sequential

    def started(*args, **kwargs):
        raise AssertionError("model work started")

    monkeypatch.setattr(sequential, "capture_block_inputs", started)


def test_a_non_utf8_file_is_named(tmp_path, tokenizer, no_model_work):
    from conftest import tiny_model
    from optimum_sparsesched import SparseScheduleConfig, compress

    (tmp_path / "a.txt").write_text(CALIBRATION_TEXT.read_text())
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 50)
    with pytest.raises(ValueError, match=r"dataset: '.*latin1.txt' is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        load_texts(tmp_path)
    with pytest.raises(ValueError, match="dataset: .*latin1.txt.* is not UTF-8"):
        compress(tiny_model("llama"), SparseScheduleConfig(dataset=tmp_path, seq_len=64, num_samples=2),
                 tokenizer=tokenizer)


def test_a_pathlib_dataset_calibrates_like_its_string(tokenizer):
    assert torch.equal(calibration_windows(CALIBRATION_TEXT, tokenizer, 4, 32, seed=0),
                       calibration_windows(str(CALIBRATION_TEXT), tokenizer, 4, 32, seed=0))


def test_a_tokenizer_of_another_vocabulary_is_refused_before_work(tokenizer, no_model_work):
    from conftest import SMALL, tiny_model
    from optimum_sparsesched import SparseScheduleConfig, compress

    model = tiny_model("llama", vocab_size=100)  # the test tokenizer has 512 ids
    with pytest.raises(ValueError, match=r"tokenizer: it produced token id \d+ .* input embeddings have 100 rows"):
        compress(model, SparseScheduleConfig(**SMALL), tokenizer=tokenizer)


def test_a_tokenizer_argument_that_is_not_a_tokenizer_is_named(no_model_work):
    from conftest import SMALL, tiny_model
    from optimum_sparsesched import SparseScheduleConfig, compress

    with pytest.raises(ValueError, match="tokenizer: a int"):
        compress(tiny_model("llama"), SparseScheduleConfig(**SMALL), tokenizer=123)


def test_a_model_folder_without_a_tokenizer_says_so_and_how_to_pass_one(save_tiny, tokenizer, tmp_path, capsys):
    from conftest import UNIFORM
    from transformers import AutoModelForCausalLM

    from optimum_sparsesched import SparseScheduleConfig, compress_checkpoint
    from optimum_sparsesched.cli import main

    source = save_tiny("llama")
    for p in source.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens")) or p.suffix in (".model", ".txt"):
            p.unlink()
    cfg = SparseScheduleConfig(sparsity=0.5, **UNIFORM)
    for run in (lambda: AutoModelForCausalLM.from_pretrained(source, quantization_config=cfg),
                lambda: compress_checkpoint(source, tmp_path / "out", cfg)):
        with pytest.raises(ValueError, match=r"tokenizer: the model folder 'llama-0' holds no tokenizer .*tokenizer="):
            run()
    options = ["--schedule", "uniform", "--dataset", str(CALIBRATION_TEXT), "--num-samples", "2", "--seq-len", "32"]
    capsys.readouterr()
    assert main(["compress", str(source), str(tmp_path / "out"), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tokenizer: the model folder 'llama-0' holds no tokenizer") and "--tokenizer" in err
    assert main(["eval", str(source), "--seq-len", "32"]) == 2 and "--tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    tokenizer_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tokenizer_dir)
    assert main(["compress", str(source), str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir), *options]) == 0
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert main(["eval", str(source), "--seq-len", "32", "--max-windows", "1", "--tokenizer", str(tokenizer_dir)]) == 0
