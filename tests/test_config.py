"""Config validation (clear errors naming the option), serialization, model-level checks before any work."""

import math

import datasets
import pytest

from conftest import CALIBRATION_TEXT, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress


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
    cfg.results.layer_sparsities = {"a": 0.7}
    d = cfg.to_dict()
    assert d["quant_method"] == "sparse_schedule" and d["dataset"].startswith("<list")
    assert d["results"]["layer_sparsities"] == {"a": 0.7} and "layer_sparsities" not in cfg.options_dict()
    back = SparseScheduleConfig.from_dict(d)
    assert back.sparsity == 0.7 and back.bits == 4 and back.results.layer_sparsities == {"a": 0.7}


def test_configs_saved_by_0_1_0_still_load():
    """0.1.0 saved the results at the top level and had a `granularity` option."""
    old = {"quant_method": "sparse_schedule", "sparsity": 0.7, "granularity": "block", "error_metric": "kl",
           "layer_sparsities": {"a": 0.7}, "layer_errors": {"a": 1.0}, "resolved_range": [0.6, 0.8],
           "eval_results": [{"metric": "perplexity", "value": 9.0}], "dataset": "/gone/calib.txt"}
    back = SparseScheduleConfig.from_dict(old)
    assert back.results.layer_sparsities == {"a": 0.7} and back.results.resolved_range == [0.6, 0.8]
    assert back.results.eval_results[0]["value"] == 9.0 and back.error_metric == "kl-alone"
    assert not hasattr(back, "granularity")


def test_fingerprint_options_leave_out_results_and_output_options():
    a = SparseScheduleConfig(sparsity=0.6, dataset=["x"], checkpoint_dir="/tmp/a", export_format="dense")
    b = SparseScheduleConfig(sparsity=0.6, dataset=["y"], checkpoint_dir="/tmp/b", max_device_memory="1GiB")
    b.results.layer_sparsities = {"m": 0.6}
    assert a.fingerprint_options() == b.fingerprint_options()
    assert SparseScheduleConfig(sparsity=0.7, dataset=["x"]).fingerprint_options() != a.fingerprint_options()


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
