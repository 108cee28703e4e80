"""``save_pretrained`` of a compressed model into a folder the user owns: only its own files are replaced, a save
killed at any instant leaves a folder that loads as the old or the new checkpoint or is refused (never a mix), what
a killed save leaves is cleaned by the next one, symlinks stay, other saves' and users' files are never deleted."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import optimum_sparsesched.publish.staging as staging
from conftest import SMALL, UNIFORM, tiny_model
from optimum_sparsesched import SparseScheduleConfig, compress
from optimum_sparsesched.publish.staging import STAGING_PREFIX

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tokenizer):
    """Two compressed tiny Llamas with different weights and results: (old, new)."""
    old = compress(tiny_model("llama", seed=0), SparseScheduleConfig(sparsity=0.5, **UNIFORM), tokenizer=tokenizer)
    new = compress(tiny_model("llama", seed=1), SparseScheduleConfig(sparsity=0.6, bits=4, group_size=32, **UNIFORM),
                   tokenizer=tokenizer)
    return old, new


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_weights(model, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def user_files(folder: Path) -> None:
    """What a user keeps in a checkpoint folder: a git clone, an evaluation subfolder, notes, their tokenizer."""
    (folder / ".git" / "objects").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".git" / "objects" / "ab12").write_bytes(b"\x00git object")
    (folder / "eval_runs" / "run1").mkdir(parents=True)
    (folder / "eval_runs" / "run1" / "ppl.json").write_text('{"ppl": 12.5}')
    (folder / "NOTES.md").write_text("mine")
    (folder / "tokenizer.json").write_text('{"not": "ours"}')


def test_save_replaces_only_its_own_files(models, tmp_path):
    old, new = models
    out = tmp_path / "out"
    out.mkdir()
    user_files(out)
    mine = snapshot(out)
    old.save_pretrained(out)
    new.save_pretrained(out)
    after = snapshot(out)
    assert {k: after[k] for k in mine} == mine  # every file of the user, byte for byte
    assert {"config.json", "model.safetensors", "README.md"} <= set(after)  # (a uniform schedule has no plot)
    assert not [p for p in out.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing beside the folder either
    assert same_weights(AutoModelForCausalLM.from_pretrained(out), new.state_dict())


def test_a_failed_save_leaves_the_folder_as_it_was(models, tmp_path, monkeypatch):
    old, new = models
    out = tmp_path / "out"
    old.save_pretrained(out)
    user_files(out)
    before = snapshot(out)
    from optimum_sparsesched.publish import shards

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shards._OpenShard, "assemble", broken)
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(out)
    assert snapshot(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


class Killed(BaseException):
    """Stands for the process dying at that instant (not an Exception: nothing may catch it)."""


@pytest.mark.parametrize("old_shards,new_shards", [(False, False), (False, True), (True, False)])
def test_a_save_stopped_at_any_instant_loads_old_or_new_or_is_refused(old_shards, new_shards, models, tmp_path,
                                                                      monkeypatch):
    old, new = models
    pristine = tmp_path / "pristine"
    old.save_pretrained(pristine, **({"max_shard_size": "20KB"} if old_shards else {}))
    new_kwargs = {"max_shard_size": "20KB"} if new_shards else {}
    real_replace, real_remove = os.replace, os.remove
    outcomes, step = [], 0
    while True:
        out = tmp_path / f"out{step}"
        subprocess.run(["cp", "-a", str(pristine), str(out)], check=True)
        calls = [0]

        def counted(real):
            def op(*args, **kwargs):
                if Path(args[-1] if real is real_replace else args[0]).parent == out:
                    if calls[0] == step:
                        raise Killed()
                    calls[0] += 1
                return real(*args, **kwargs)
            return op

        monkeypatch.setattr(staging.os, "replace", counted(real_replace))
        monkeypatch.setattr(staging.os, "remove", counted(real_remove))
        try:
            new.save_pretrained(out, **new_kwargs)
            finished = True
        except Killed:
            finished = False
        monkeypatch.undo()
        try:
            loaded = AutoModelForCausalLM.from_pretrained(out)
            outcome = "new" if same_weights(loaded, new.state_dict()) else "old" if same_weights(
                loaded, old.state_dict()) else "MIX"
        except ValueError as exc:  # weights and config.json of different saves
            outcome = "refused" if "come from different saves" in str(exc) else f"error: {exc}"
        except OSError as exc:  # no weights file at all
            outcome = "refused" if "no file named" in str(exc) else f"error: {exc}"
        outcomes.append(outcome)
        if finished:
            break
        step += 1
    assert outcomes[0] == "old" and outcomes[-1] == "new", outcomes
    assert set(outcomes) <= {"old", "new", "refused"}, outcomes  # never a mix, never another error
    assert step >= 3  # the stop really came between the renames
    old.save_pretrained(tmp_path / "out0")  # a later save of a folder left anyhow gives a clean checkpoint
    assert same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "out0"), old.state_dict())


KILL = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import torch
    from conftest import tiny_model
    import optimum_sparsesched.publish.staging as staging
    from optimum_sparsesched import SparseScheduleConfig, compress
    from transformers import AutoTokenizer
    model = compress(tiny_model("llama"), SparseScheduleConfig(sparsity=0.5, **{uniform!r}),
                     tokenizer=AutoTokenizer.from_pretrained(sys.argv[2]))
    real = os.replace
    def replace(src, dst):
        if str(dst).endswith(".safetensors"):
            os._exit(9)  # killed in the middle of the swap
        return real(src, dst)
    staging.os.replace = replace
    model.save_pretrained(sys.argv[1])
""")


def test_leftovers_of_a_killed_save_are_removed_by_the_next(models, tmp_path, tokenizer_dir):
    old, _ = models
    out = tmp_path / "out"
    old.save_pretrained(out)
    legacy = tmp_path / ".out.tmp-0123abcd"  # 0.2 staged beside the folder
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    script = tmp_path / "kill.py"
    script.write_text(KILL.format(tests=str(TESTS), uniform=UNIFORM))
    run = subprocess.run([sys.executable, str(script), str(out), str(tokenizer_dir)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 9, run.stderr[-2000:]
    assert [p for p in out.iterdir() if p.name.startswith(STAGING_PREFIX)]  # the killed save's staging folder
    old.save_pretrained(out)
    assert not [p for p in out.iterdir() if p.name.startswith(STAGING_PREFIX)] and not legacy.exists()
    assert same_weights(AutoModelForCausalLM.from_pretrained(out), old.state_dict())


def test_push_to_hub_never_uploads_a_killed_saves_leftovers(models, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc
    from huggingface_hub import snapshot_download

    from hub_server import LocalHub
    from optimum_sparsesched import push_to_hub

    old, _ = models
    out = tmp_path / "out"
    old.save_pretrained(out)
    leftover = out / f"{STAGING_PREFIX}dead"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half written")
    with LocalHub() as hub:
        monkeypatch.setattr(hc, "ENDPOINT", hub.url)
        monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")
        push_to_hub(out, "org/leftovers")
        remote = Path(snapshot_download("org/leftovers", endpoint=hub.url, cache_dir=tmp_path / "cache"))
        uploaded = {str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file()}
    assert "config.json" in uploaded and not [n for n in uploaded if STAGING_PREFIX in n], uploaded


def test_a_symlinked_folder_stays_a_symlink(models, tmp_path):
    old, _ = models
    real = tmp_path / "disk" / "ckpt"
    real.mkdir(parents=True)
    (real / "NOTES.md").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    old.save_pretrained(link)
    old.save_pretrained(link)
    assert link.is_symlink() and (real / "model.safetensors").is_file() and (real / "NOTES.md").read_text() == "mine"
    assert same_weights(AutoModelForCausalLM.from_pretrained(link), old.state_dict())


def test_stale_shards_of_our_earlier_save_go_other_files_stay(models, tmp_path):
    old, new = models
    out = tmp_path / "out"
    new.save_pretrained(out, max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    save_file({"x": torch.zeros(2)}, str(out / "model-00009-of-00009.safetensors"))  # not written by us
    new.save_pretrained(out)  # single file now: the old shards and index are ours and stale
    left = {p.name for p in out.iterdir()}
    assert not set(shards) & left and "model.safetensors.index.json" not in left
    assert "model-00009-of-00009.safetensors" in left and "model.safetensors" in left
    assert same_weights(AutoModelForCausalLM.from_pretrained(out), new.state_dict())


def test_foreign_weights_that_would_shadow_the_new_ones_are_refused(models, tmp_path):
    _, new = models
    out = tmp_path / "out"
    tiny_model("llama", seed=5).save_pretrained(out)  # a plain transformers save: not ours
    before = snapshot(out)
    with pytest.raises(ValueError, match="model.safetensors, which optimum-sparsesched did not write"):
        new.save_pretrained(out, max_shard_size="20KB", overwrite=True)  # replacing it is allowed, shadowing it not
    assert snapshot(out) == before
    new.save_pretrained(out, overwrite=True)  # same layout: model.safetensors is one of the files this save writes
    assert same_weights(AutoModelForCausalLM.from_pretrained(out), new.state_dict())


def test_two_saves_into_one_folder_at_once_are_refused(models, tmp_path):
    old, _ = models
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another save holds the folder
    try:
        with pytest.raises(ValueError, match="save_directory.*another save"):
            old.save_pretrained(out)
    finally:
        os.close(fd)
    assert list(out.iterdir()) == []


def test_saving_into_the_checkpoint_dir_is_refused(tokenizer, tmp_path):
    ckpt = tmp_path / "ckpt"
    model = compress(tiny_model("llama"), SparseScheduleConfig(sparsity=0.5, checkpoint_dir=ckpt, **UNIFORM),
                     tokenizer=tokenizer)
    before = snapshot(ckpt)
    for folder in (ckpt, ckpt / "model", tmp_path):
        with pytest.raises(ValueError, match="save_directory.*overlaps checkpoint_dir"):
            model.save_pretrained(folder)
    assert snapshot(ckpt) == before
    model.save_pretrained(tmp_path / "apart")
    assert (tmp_path / "apart" / "config.json").is_file()


def test_no_local_path_is_saved(tokenizer_dir, tmp_path):
    """Absolute paths of the dataset, the tokenizer and checkpoint_dir never reach config.json or the card."""
    data = tmp_path / "private" / "calibration-notes.txt"
    data.parent.mkdir()
    data.write_bytes(Path(SMALL["dataset"]).read_bytes())
    options = {**SMALL, "dataset": str(data)}
    cfg = SparseScheduleConfig(sparsity=0.5, tokenizer=str(tokenizer_dir), checkpoint_dir=tmp_path / "ckpt",
                               **options)
    model = compress(tiny_model("llama"), cfg)
    model.save_pretrained(tmp_path / "out")
    for name, content in snapshot(tmp_path / "out").items():
        for secret in (str(tmp_path), str(tokenizer_dir), str(tmp_path / "ckpt")):
            assert secret.encode() not in content, (name, secret)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    import hashlib

    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    assert saved["dataset"] == f"<file calibration-notes.txt sha256:{digest}>" and "checkpoint_dir" not in saved
    assert saved["tokenizer"] == f"<local {tokenizer_dir.name}>"
    assert same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), model.state_dict())
