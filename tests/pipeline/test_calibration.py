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
