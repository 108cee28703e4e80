"""Config validation (clear errors naming the option), serialization, and calibration windows."""

import math

import datasets
import pytest
import torch

from conftest import CALIBRATION_TEXT, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress
from optimum_sparsesched.calibration import calibration_windows, load_texts, sample_windows


@pytest.mark.parametrize("kwargs,option", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"), (dict(sparsity=math.nan), "sparsity"),
    (dict(sparsity="0.5"), "sparsity"), (dict(schedule="magic"), "schedule"),
    (dict(pattern="4:2"), "pattern"), (dict(pattern="2:0"), "pattern"), (dict(pattern="x"), "pattern"),
    (dict(pattern="1:4"), "sparsity"), (dict(bits=3), "bits"), (dict(bits=16), "bits"),
    (dict(group_size=0), "group_size"), (dict(num_samples=0), "num_samples"), (dict(seq_len=-5), "seq_len"),
    (dict(block_size=0), "block_size"), (dict(damp=0), "damp"), (dict(damp=math.inf), "damp"),
    (dict(dataset="/no/such/file.txt"), "dataset"), (dict(dataset=[]), "dataset"), (dict(dataset=[1, 2]), "dataset"),
    (dict(dataset=datasets.Dataset.from_dict({"content": ["a"]})), "dataset"),
    (dict(modules_to_not_convert=[""]), "modules_to_not_convert"), (dict(sym="yes"), "sym"),
])
def test_bad_options_name_the_parameter(kwargs, option):
    with pytest.raises(ValueError, match=f"`{option}`"):
        SparseScheduleConfig(**kwargs)


def test_unknown_option_is_rejected():
    with pytest.raises(TypeError, match="sparsityy"):
        SparseScheduleConfig(sparsityy=0.5)


def test_round_trip_through_dict():
    cfg = SparseScheduleConfig(sparsity=0.7, pattern=None, bits=4, group_size=64, dataset=["some text"])
    cfg.layer_sparsities = {"a": 0.7}
    d = cfg.to_dict()
    assert d["quant_method"] == "sparse_schedule" and d["dataset"].startswith("<list")
    back = SparseScheduleConfig.from_dict(d)
    assert back.sparsity == 0.7 and back.bits == 4 and back.layer_sparsities == {"a": 0.7}


def test_model_level_checks_before_work(tokenizer):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="seq_len"):
        compress(model, SparseScheduleConfig(seq_len=4096, dataset=str(CALIBRATION_TEXT)), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="modules_to_not_convert"):
        compress(model, SparseScheduleConfig(modules_to_not_convert=["nonexistent_proj"], dataset=["x"], seq_len=64),
                 tokenizer=tokenizer)
    with pytest.raises(ValueError, match="dataset"):
        compress(model, SparseScheduleConfig(dataset=["too short"], seq_len=64), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="no compressible"):
        compress(model, SparseScheduleConfig(modules_to_not_convert=["self_attn", "mlp"], dataset=["x"], seq_len=64),
                 tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        compress(model, SparseScheduleConfig(dataset=["x"], seq_len=64, tokenizer="/no/such/tokenizer"))
    assert all((p != 0).all() for n, p in model.named_parameters() if n.endswith("proj.weight"))


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
