"""Resume state is never trusted: the weights must be those the saved blocks were made from, every block file is
checked against its SHA-256, a damaged manifest is named, one run at a time per folder, an unwritable folder is found
before any work."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os

import pytest
import torch

import optimum_sparsesched.sequential as sequential
from conftest import SMALL, UNIFORM, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress
from optimum_sparsesched.pipeline.checkpoint import LOCK_FILE, BlockCheckpoint
from optimum_sparsesched.pipeline.digest import block_digest, parameters_digest


def run(model, ckpt, tokenizer, **options):
    options = {**UNIFORM, **options}
    return compress(model, SparseScheduleConfig(sparsity=0.6, checkpoint_dir=str(ckpt), **options), tokenizer=tokenizer)


def reference(tokenizer, family="llama", **options):
    """The weights of an uninterrupted run without checkpoint_dir."""
    options = {**UNIFORM, **options}
    model = compress(tiny_model(family, num_hidden_layers=4),
                     SparseScheduleConfig(sparsity=0.6, **options), tokenizer=tokenizer)
    return model.state_dict()


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if calibration starts (errors must come before any work)."""
    def started(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(sequential, "calibration_windows", started)


def test_digest_covers_the_values():
    a = torch.nn.Linear(4, 4)
    before = parameters_digest(a.named_parameters())
    assert parameters_digest(a.named_parameters()) == before
    with torch.no_grad():
        a.weight[0, 0] += 1e-3
    assert parameters_digest(a.named_parameters()) != before
    b = torch.nn.Linear(4, 4).to(torch.bfloat16)
    assert len(block_digest(b)) == 64  # bf16 bytes hash too


@pytest.mark.parametrize("schedule", ["uniform", "hessian"])
def test_another_finetune_of_the_same_architecture_is_refused(schedule, tmp_path, tokenizer):
    ckpt = tmp_path / "ckpt"
    run(tiny_model("llama", num_hidden_layers=4), ckpt, tokenizer, schedule=schedule)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    if schedule == "hessian":  # killed after block 0: the schedule in the manifest was measured on every block
        manifest["finished_blocks"] = 1
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
    other = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():  # the same model except for the last block: a partial fine-tune
        other.model.layers[3].mlp.down_proj.weight.mul_(1.01)
    untouched = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"checkpoint_dir.*decoder block 3 had other weights"):
        run(other, ckpt, tokenizer, schedule=schedule)
    assert all(torch.equal(v, untouched[k]) for k, v in other.state_dict().items())  # refused before any change
    embeddings = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():
        embeddings.model.embed_tokens.weight[0, 0] += 1
    with pytest.raises(ValueError, match="checkpoint_dir.*outside the decoder blocks"):
        run(embeddings, ckpt, tokenizer, schedule=schedule)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_a_damaged_block_file_is_recomputed_with_a_warning(damage, tmp_path, tokenizer, caplog):
    ckpt = tmp_path / "ckpt"
    run(tiny_model("llama", num_hidden_layers=4), ckpt, tokenizer)
    block = ckpt / "block_00001.safetensors"
    size = block.stat().st_size
    if damage == "garbage":
        block.write_bytes(os.urandom(size))
    elif damage == "truncated":
        block.write_bytes(block.read_bytes()[: size // 2])
    else:
        block.unlink()
    model = tiny_model("llama", num_hidden_layers=4)
    with caplog.at_level(logging.WARNING, logger="optimum_sparsesched"):
        run(model, ckpt, tokenizer)
    assert "block_00001.safetensors is damaged or missing" in caplog.text
    expected = reference(tokenizer)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["finished_blocks"] == 4
    assert hashlib.sha256(block.read_bytes()).hexdigest() == manifest["files"]["1"]  # repaired


@pytest.mark.parametrize("content", [b"", b'{"version": 2, "fingerprint": "ab', b"\xff\xfe garbage", b"[1, 2]",
                                     "fields"])
def test_a_damaged_manifest_names_the_checkpoint_dir(content, tmp_path, tokenizer):
    ckpt = tmp_path / "ckpt"
    run(tiny_model("llama"), ckpt, tokenizer)
    if content == "fields":
        manifest = json.loads((ckpt / "manifest.json").read_text())
        del manifest["files"]
        content = json.dumps(manifest).encode()
    (ckpt / "manifest.json").write_bytes(content)
    with pytest.raises(ValueError, match=f"checkpoint_dir: '{ckpt}'.*manifest.json"):
        run(tiny_model("llama"), ckpt, tokenizer)


def test_a_second_run_in_the_same_folder_is_refused(tmp_path, tokenizer, no_work):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    fd = os.open(ckpt / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds the folder
    try:
        with pytest.raises(ValueError, match=f"checkpoint_dir: '{ckpt}' is in use by another compression run"):
            run(tiny_model("llama"), ckpt, tokenizer)
    finally:
        os.close(fd)


def test_the_lock_is_released_when_a_run_fails(tmp_path, tokenizer, no_work):
    ckpt = tmp_path / "ckpt"
    for _ in range(2):  # the second attempt is not refused as "in use": the failed one let go of the folder
        with pytest.raises(AssertionError, match="calibration started"):
            run(tiny_model("llama"), ckpt, tokenizer)


def test_an_unwritable_checkpoint_dir_is_refused_before_any_work(tmp_path, tokenizer, no_work):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match=f"checkpoint_dir: '{blocker / 'ckpt'}' is not a writable folder"):
        run(tiny_model("llama"), blocker / "ckpt", tokenizer)


def test_a_read_only_checkpoint_dir_is_refused_before_any_work(tmp_path, tokenizer, no_work):
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):
            pytest.skip("running as root: permission bits do not stop writes")
        with pytest.raises(ValueError, match="checkpoint_dir.*not a writable folder"):
            run(tiny_model("llama"), read_only, tokenizer)
    finally:
        read_only.chmod(0o755)


def test_temporary_names_are_unique_per_run_and_leftovers_removed(tmp_path):
    a, b = BlockCheckpoint(tmp_path / "ckpt", "f"), BlockCheckpoint(tmp_path / "ckpt", "f")
    assert a._tag != b._tag
    (tmp_path / "ckpt").mkdir()
    leftovers = [".block_00003.safetensors.4242-0123abcd.tmp", "manifest.json.tmp", "block_00001.safetensors.tmp"]
    for name in leftovers:
        (tmp_path / "ckpt" / name).write_bytes(b"partial")
    (tmp_path / "ckpt" / "notes.tmp").write_text("not ours")
    a.open()
    try:
        manifest = a.start({}, {}, None, "outside", {})
        a.save_block(manifest, 0, {"w": torch.ones(2)}, {}, {}, "digest")
    finally:
        a.close()
    names = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert names == {"manifest.json", "block_00000.safetensors", LOCK_FILE, "notes.tmp"}
