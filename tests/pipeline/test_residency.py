"""Device residency under max_device_memory: config parsing, the pure placement decision, the working-set
accounting, an end-to-end run with the activations forced off the device (bit-identical weights), the refusal of
too small a budget, and the progress bar's running error (offloaded weights: tests/pipeline/test_offload.py)."""

import dataclasses

import pytest
import torch

from conftest import UNIFORM, CALIBRATION_TEXT, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress
from optimum_sparsesched import sequential
from optimum_sparsesched.pipeline.blocks import capture_block_inputs
from optimum_sparsesched.pipeline.residency import activation_bytes, decide_residency, estimate_working_set, store
from optimum_sparsesched.pipeline.plan import plan_compression



@pytest.mark.parametrize("value,expected", [
    (None, None), (1024, 1024), ("2GiB", 2 * 2**30), ("512MB", 512 * 10**6), ("1.5GB", 1_500_000_000),
    ("1.5 gb", 1_500_000_000), ("64KiB", 65536), ("4096", 4096), ("100B", 100),
])
def test_max_device_memory_forms(value, expected):
    cfg = SparseScheduleConfig(max_device_memory=value)
    assert cfg.max_device_memory_bytes == expected
    assert cfg.to_dict()["max_device_memory"] == value
    assert SparseScheduleConfig.from_dict(cfg.to_dict()).max_device_memory_bytes == expected


@pytest.mark.parametrize("value", [0, -5, 1.5e9, True, "", "lots", "2XB", "GB", "-1GB", "0MB", [1]])
def test_bad_max_device_memory_names_option_and_forms(value):
    with pytest.raises(ValueError, match=r"`max_device_memory`.*positive int number of bytes.*2GiB"):
        SparseScheduleConfig(max_device_memory=value)


def test_decision_activations_fit_on_device():
    r = decide_residency(working_set=100, activations=50, budget=150, device="cpu", cuda_available=False)
    assert r.activations_on_device and r.storage == torch.device("cpu") and not r.pin_memory and r.peak == 150


def test_decision_activations_offloaded_and_pinned_with_cuda():
    r = decide_residency(working_set=100, activations=51, budget=150, device="cuda", cuda_available=True)
    assert not r.activations_on_device and r.storage == torch.device("cpu") and r.pin_memory and r.peak == 100
    r = decide_residency(working_set=100, activations=51, budget=150, device="cpu", cuda_available=False)
    assert not r.activations_on_device and not r.pin_memory


def test_decision_without_budget_uses_free_memory_or_keeps_everything():
    assert decide_residency(100, 10**12, None, "cpu", free_bytes=None).activations_on_device
    r = decide_residency(100, 1000, None, "cuda", free_bytes=500, cuda_available=True)
    assert not r.activations_on_device and r.pin_memory
    assert decide_residency(10**15, 0, None, "cuda", free_bytes=5).working_set == 10**15  # no cap: never refused


def test_decision_block_does_not_fit():
    with pytest.raises(ValueError, match=r"max_device_memory: 99 bytes .* needs 100 bytes"):
        decide_residency(working_set=100, activations=0, budget=99, device="cpu")


def test_working_set_accounting_of_a_llama_block():
    model = tiny_model("llama")  # q,o 64->64; k,v 64->32; gate,up 64->128; down 128->64
    cfg = SparseScheduleConfig(sparsity=0.5, **UNIFORM)
    plan = plan_compression(model, cfg.plan_spec())
    spec = cfg.residency_spec()
    ws = estimate_working_set(model, plan.blocks, plan.modules, spec)
    sum_cols2 = 6 * 64**2 + 128**2
    assert ws.hessians == 4 * (3 * sum_cols2 + 3 * 128**2)
    assert ws.weights == sum(p.numel() * 4 for p in plan.blocks[0].parameters())
    assert ws.obs == 4 * (3 * 128 * 64 + 5 * 128 * 64)  # gate/up/down have the most weights; B=128 > 64 cols
    assert ws.forward == 4 * 64 * (2 * 64 + (64 + 32 + 32 + 64 + 128 + 128 + 64)) + 4 * 4 * 64**2 + 4 * 2 * 64 * 128
    assert ws.schedule_copy == 0
    damage = dataclasses.replace(spec, damage_streams=1)
    assert estimate_working_set(model, plan.blocks, plan.modules, damage).schedule_copy == ws.weights
    inputs = capture_block_inputs(model, torch.randint(1, 500, (4, 64)), "cpu")
    window = 64 * 64 * 4
    assert activation_bytes(inputs, 0, 0) >= 5 * window  # 4 windows + one in flight + the blocks' arguments
    assert activation_bytes(inputs, 2, 1) - activation_bytes(inputs, 0, 0) == 2 * (2 + 2) * window


def test_store_keeps_pinned_buffers_else_moves():
    out, prev = torch.ones(2, 3), torch.zeros(2, 3)
    assert store(out, prev) is out  # not pinned: the output itself (already on the CPU)


def _spy(monkeypatch):
    decisions = []
    original = sequential.decide_for_inputs

    def spy(*args, **kwargs):
        decisions.append(original(*args, **kwargs))
        return decisions[-1]

    monkeypatch.setattr(sequential, "decide_for_inputs", spy)
    return decisions


def test_budget_forcing_activation_offload_gives_identical_weights(tokenizer, monkeypatch):
    reference = tiny_model("llama")
    compress(reference, SparseScheduleConfig(sparsity=0.5, **UNIFORM), tokenizer=tokenizer)
    decisions = _spy(monkeypatch)
    probe = tiny_model("llama")
    compress(probe, SparseScheduleConfig(sparsity=0.5, **UNIFORM), tokenizer=tokenizer)
    free = decisions[-1]
    assert free.activations_on_device and free.budget is None
    budget = free.working_set + free.activations // 2  # the block fits, the activations do not
    model = tiny_model("llama")
    cfg = SparseScheduleConfig(sparsity=0.5, max_device_memory=budget, **UNIFORM)
    compress(model, cfg, tokenizer=tokenizer)
    capped = decisions[-1]
    assert capped.budget == budget and not capped.activations_on_device and capped.peak <= budget
    assert model.config.quantization_config.max_device_memory == budget
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_budget_too_small_for_one_block_is_refused_before_work(tokenizer, monkeypatch):
    def no_calibration(*a, **k):
        raise AssertionError("must fail before calibration")

    monkeypatch.setattr(sequential, "calibration_windows", no_calibration)
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"max_device_memory: 1000000 bytes .* needs \d+ bytes .*block 0"):
        compress(model, SparseScheduleConfig(sparsity=0.5, max_device_memory="1MB", **UNIFORM), tokenizer=tokenizer)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_progress_bar_shows_running_error_and_total(tokenizer, capfd):
    model = tiny_model("llama")
    cfg = SparseScheduleConfig(sparsity=0.5, **UNIFORM)
    compress(model, cfg, tokenizer=tokenizer)
    err = capfd.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("sparsegpt")]
    first = next(line for line in lines if "1/2" in line)  # refreshed after every block, with its running error
    assert "err=" in first and "<" in first  # total known: count and elapsed<remaining (ETA)
    final = lines[-1]
    assert "2/2" in final
    shown = float(final.split("err=")[1].rstrip("]").strip())
    assert shown == pytest.approx(sum(cfg.results.layer_errors.values()), rel=1e-3)
