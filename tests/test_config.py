"""Config validation (clear errors naming the option), serialization, model-level checks before any work."""

import json
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
    (dict(modules_to_not_convert=5), "modules_to_not_convert"), (dict(seed=2**70), "seed"),
    (dict(seed=2**64), "seed"), (dict(seed=-(2**63) - 1), "seed"), (dict(seed=1.5), "seed"),
    (dict(tokenizer=123), "tokenizer"), (dict(tokenizer=" "), "tokenizer"), (dict(damp=1e300), "damp"),
    (dict(damp=1.5), "damp"), (dict(num_samples=10**9), "num_samples"), (dict(num_samples=65537), "num_samples"),
    (dict(preset="fast"), "preset"), (dict(preset=None), "preset"), (dict(solver="alps"), "solver"),
    (dict(search_steps=-1), "search_steps"), (dict(search_steps=1.5), "search_steps"),
    (dict(search_steps=True), "search_steps"), (dict(search_steps=10**6), "search_steps"),
    (dict(schedule="uniform", search_steps=4), "search_steps"),
    (dict(true_sequential=True), "true_sequential"), (dict(granularity="module"), "granularity"),
])
def test_bad_options_name_the_parameter(kwargs, option):
    with pytest.raises(ValueError, match=f"`{option}`"):
        SparseScheduleConfig(**kwargs)


def test_bounds_explain_themselves():
    with pytest.raises(ValueError, match="0 < damp <= 1.*magnitude pruning"):
        SparseScheduleConfig(damp=1e300)
    with pytest.raises(ValueError, match="at most 65536.*activations are kept in memory"):
        SparseScheduleConfig(num_samples=10**9)
    with pytest.raises(ValueError, match="torch.Generator"):
        SparseScheduleConfig(seed=2**70)
    for seed in (-(2**63), 2**64 - 1):  # the ends of torch.Generator's range are accepted
        SparseScheduleConfig(seed=seed, dataset=["x"])
    assert SparseScheduleConfig(damp=1.0, num_samples=65536, dataset=["x"]).damp == 1.0


def test_a_module_name_or_a_path_where_a_list_or_str_is_expected():
    assert SparseScheduleConfig(modules_to_not_convert="lm_head").modules_to_not_convert == ["lm_head"]
    assert SparseScheduleConfig(modules_to_not_convert=None).modules_to_not_convert == []
    cfg = SparseScheduleConfig(dataset=CALIBRATION_TEXT, checkpoint_dir=CALIBRATION_TEXT.parent / "ckpt")
    assert cfg.dataset == str(CALIBRATION_TEXT) and cfg.checkpoint_dir == str(CALIBRATION_TEXT.parent / "ckpt")


def test_the_saved_dict_holds_no_local_path(tmp_path):
    import hashlib

    data = tmp_path / "folder"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("first text")
    (data / "sub" / "b.txt").write_text("second text")
    for dataset, expected in [
        (CALIBRATION_TEXT, f"<file calibration.txt sha256:{hashlib.sha256(CALIBRATION_TEXT.read_bytes()).hexdigest()}>"),
        (data, "<folder folder: 2 .txt files sha256:"), ("wikitext2", "wikitext2"), (["x", "y"], "<list of 2 texts>"),
    ]:
        saved = SparseScheduleConfig(dataset=dataset, checkpoint_dir=tmp_path / "ckpt", tokenizer=str(tmp_path)).to_dict()
        assert saved["dataset"].startswith(expected) and str(tmp_path) not in json.dumps(saved), saved
        assert "checkpoint_dir" not in saved and saved["tokenizer"] == f"<local {tmp_path.name}>"
    before = SparseScheduleConfig(dataset=data).to_dict()["dataset"]
    (data / "a.txt").write_text("changed")  # the description identifies the content
    assert SparseScheduleConfig(dataset=data).to_dict()["dataset"] != before
    assert SparseScheduleConfig(tokenizer="org/tok").to_dict()["tokenizer"] == "org/tok"  # a hub id is kept
    back = SparseScheduleConfig.from_dict(SparseScheduleConfig(dataset=CALIBRATION_TEXT).to_dict())
    assert back.dataset.startswith("<file calibration.txt sha256:")


def test_presets_fill_what_is_not_given():
    assert (SparseScheduleConfig().solver, SparseScheduleConfig().search_steps) == ("refit", 0)
    quality = SparseScheduleConfig(preset="quality")
    assert (quality.solver, quality.search_steps) == ("admm", 8)
    assert SparseScheduleConfig(preset="quality", schedule="uniform").search_steps == 0  # search needs hessian
    assert SparseScheduleConfig(preset="quality", pattern="2:4").search_steps == 0
    assert SparseScheduleConfig(preset="sparsegpt").solver == "sparsegpt"
    explicit = SparseScheduleConfig(preset="quality", solver="sparsegpt", search_steps=2)
    assert (explicit.solver, explicit.search_steps) == ("sparsegpt", 2)
    again = SparseScheduleConfig.from_dict(quality.to_dict())
    assert (again.preset, again.solver, again.search_steps) == ("quality", "admm", 8)


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
    old = {"quant_method": "sparse_schedule", "sparsity": 0.7, "granularity": "block", "true_sequential": True, "error_metric": "kl",
           "layer_sparsities": {"a": 0.7}, "layer_errors": {"a": 1.0}, "resolved_range": [0.6, 0.8],
           "eval_results": [{"metric": "perplexity", "value": 9.0}], "dataset": "/gone/calib.txt"}
    back = SparseScheduleConfig.from_dict(old)
    assert back.results.layer_sparsities == {"a": 0.7} and back.results.resolved_range == [0.6, 0.8]
    assert back.results.eval_results[0]["value"] == 9.0 and back.error_metric == "kl-alone"
    assert not hasattr(back, "granularity")
    assert (back.preset, back.solver, back.search_steps) == ("sparsegpt", "sparsegpt", 0)  # what ran before presets
    assert not hasattr(back, "true_sequential")


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
