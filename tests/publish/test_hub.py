"""Model card and Hub publishing against a real local Hub API server (tests/hub_server.py) with the real
huggingface_hub client: push a compressed checkpoint, download it back, compare every byte, read the published card;
bad input fails before any request; the CLI push, ``optimum-cli sparse-schedule`` and the publish example."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, snapshot_download
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import optimum_sparsesched as osp
from conftest import SMALL, CALIBRATION_TEXT, tiny_model
from hub_server import LocalHub
from optimum_sparsesched.pipeline.checkpoint import fingerprint
from optimum_sparsesched.cli import main
from optimum_sparsesched.publish.model_card import PLOT_FILE, base_model_id, block_rows, build_model_card

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_local_test_token"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def hub(monkeypatch):
    """A local Hub; huggingface_hub in this process talks to it (endpoint, online, a dummy token). Both
    module constants derived from HF_ENDPOINT at import are patched: ``hf_hub_url`` formats the URL template and
    swaps ``ENDPOINT`` for an ``endpoint=`` argument only where the template starts with it."""
    import huggingface_hub.constants as hc

    with LocalHub() as server:
        monkeypatch.setattr(hc, "ENDPOINT", server.url)
        monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def hub_env(hub: LocalHub, tmp_path: Path) -> dict[str, str]:
    """Environment of a fresh process that talks to ``hub`` (HF_ENDPOINT is read when huggingface_hub imports)."""
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tokenizer):
    """A compressed tiny Llama (Hessian schedule, INT4) from hub id "org/tiny-llama" with a recorded perplexity,
    saved with its card; returns (model, folder)."""
    model = tiny_model("llama")
    model.config._name_or_path = "org/tiny-llama"
    osp.compress(model, osp.SparseScheduleConfig(sparsity=0.6, sparsity_range=(0.5, 0.7), bits=4, group_size=32,
                                                  **SMALL), tokenizer=tokenizer)
    osp.record_eval_result(model, 42.5, dataset=CALIBRATION_TEXT, split="test", seq_len=64, windows=2)
    folder = tmp_path_factory.mktemp("saved") / "tiny-llama-sparse"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, folder


def download(hub: LocalHub, repo_id: str, tmp_path: Path, revision: str | None = None) -> Path:
    return Path(snapshot_download(repo_id, revision=revision, endpoint=hub.url, cache_dir=tmp_path / "cache"))


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def card_json(card: ModelCard) -> str:
    return re.search(r"```json\n(.*?)\n```", card.text, re.S).group(1)


def expected_options(saved: dict) -> dict:
    """The options as the card shows them: no results, local paths reduced to their file name."""
    options = {k: v for k, v in json.loads(json.dumps(saved, default=str)).items() if k != "results"}
    return {**options, "dataset": Path(options["dataset"]).name}


def check_our_card(path: Path, model) -> ModelCard:
    """The README at ``path`` is this package's card of ``model`` (the tiny Llama of ``compressed``)."""
    card = ModelCard.load(path)
    cfg = model.config.quantization_config
    assert card.data.base_model == "org/tiny-llama"
    assert {"pruned", "sparse", "sparsegpt", "optimum-sparsesched", "int4"} <= set(card.data.tags)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    (result,) = card.data.eval_results
    assert (result.metric_type, result.metric_value, result.dataset_name, result.dataset_split) == (
        "perplexity", 42.5, "calibration.txt", "test")
    assert result.metric_args == {"seq_len": 64, "windows": 2}
    assert f"![Achieved sparsity per decoder block against the target]({PLOT_FILE})" in card.text
    modules = dict(model.named_modules())
    for index in range(2):  # one row per decoder block: index, parameters, weighted sparsity, every module
        names = [n for n in cfg.results.layer_sparsities if f".layers.{index}." in n]
        params = sum(modules[n].weight.numel() for n in names)
        mean = sum(modules[n].weight.numel() * cfg.results.layer_sparsities[n] for n in names) / params
        row = next(line for line in card.text.splitlines() if line.startswith(f"| {index} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:3] == [str(index), f"{params:,}", f"{mean:.3f}"]
        assert cells[3:] == [f"{cfg.results.layer_sparsities[n]:.3f}" for n in names]
    assert "import optimum_sparsesched" in card.text and "AutoModelForCausalLM.from_pretrained(" in card.text
    assert json.loads(card_json(card)) == expected_options(cfg.to_dict())
    visible = card.text.split("## Details")[0]
    sizes = {n: m.weight.numel() for n, m in modules.items() if n in cfg.results.layer_sparsities}
    achieved = sum(sizes[n] * s for n, s in cfg.results.layer_sparsities.items()) / sum(sizes.values())
    assert abs(achieved - 0.6) < 0.01  # zeros counted after INT4 (a kept weight can round to 0)
    assert visible.lstrip().startswith(f"# tiny-llama, {achieved:.0%} sparse + INT4\n")  # a title from the model
    assert f"to **{achieved:.1%}** sparsity" in visible
    assert "**Weights:** [org/tiny-llama](https://huggingface.co/org/tiny-llama)" in visible
    assert "| perplexity | 42.50 | `calibration.txt` | test | 2 windows × 64 tokens |" in visible
    assert len(visible.splitlines()) < 50 and "layer_errors" not in card.text  # short; details collapsed
    assert card.text.count("<details>") == 2 and str(CALIBRATION_TEXT.parent) not in card.text
    assert "This is the model card of a 🤗 transformers model" not in card.text  # not transformers' template
    return card


# ---------------------------------------------------------------------------------------------- the card itself
def test_saved_card_describes_the_checkpoint(compressed):
    model, folder = compressed
    card = check_our_card(folder / "README.md", model)
    assert (folder / PLOT_FILE).read_bytes().startswith(PNG_MAGIC)
    saved = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert saved["results"]["eval_results"] == [{"metric": "perplexity", "value": 42.5, "dataset": "calibration.txt",
                                      "split": "test", "seq_len": 64, "windows": 2}]
    assert json.loads(card_json(card)) == expected_options(saved)  # the options of the run (results: config.json)
    reloaded = osp.SparseScheduleConfig.from_dict(saved)
    assert reloaded.results.eval_results == saved["results"]["eval_results"]


def test_card_metadata_for_patterns_bits_hub_datasets_and_local_bases():
    sparsities = {f"transformer.h.{i}.{m}": 0.5 for i in range(3) for m in ("attn.c_attn", "mlp.c_fc")}
    sparsities["score"] = 0.5  # a module outside the numbered blocks
    qc = osp.SparseScheduleConfig(sparsity=0.5, pattern="2:4", bits=8, dataset="wikitext2", results=dict(
        layer_sparsities=sparsities, eval_results=[{"metric": "perplexity", "value": 20.0, "dataset": "wikitext2",
                                                    "split": "test", "seq_len": 2048}]))
    sizes = {n: 100 * (i + 1) for i, n in enumerate(sparsities)}
    card = build_model_card(qc, sizes=sizes, base_model=None, repo_id="me/gpt2-24", plot_file=None)
    data = card.data
    assert data.base_model is None and data.model_name == "gpt2-24"
    assert {"int8", "gptq", "2:4"} <= set(data.tags) and data.datasets == ["Salesforce/wikitext"]
    assert data.eval_results[0].dataset_type == "Salesforce/wikitext"
    assert data.eval_results[0].dataset_config == "wikitext-2-raw-v1"
    assert "sparsity_schedule.png" not in card.text and 'from_pretrained("me/gpt2-24")' in card.text
    assert [r.index for r in block_rows(sparsities, sizes)] == [0, 1, 2, None]
    assert "| other |" in card.text and "`attn.c_attn`" in card.text
    assert "block reconstruction" not in card.text
    qc.reconstruct_epochs = 3
    assert "fitted to the dense block's outputs (3 epochs of block reconstruction)" in build_model_card(qc, sizes=sizes).text
    assert base_model_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert base_model_id(str(CALIBRATION_TEXT)) is None and base_model_id("") is None
    with pytest.raises(ValueError, match="layer_sparsities"):
        build_model_card(osp.SparseScheduleConfig())


def test_a_uniform_schedule_is_one_sentence_and_no_plot(tokenizer, tmp_path):
    model = tiny_model("llama")
    model.config._name_or_path = str(tmp_path / "my-model")  # a local path: the title takes its last component
    osp.compress(model, osp.SparseScheduleConfig(sparsity=0.5, schedule="uniform", **SMALL), tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.text.lstrip().startswith("# my-model, 50% sparse\n") and card.data.base_model is None
    assert "Every decoder block is at sparsity 0.500." in card.text and "**Weights:** a local checkpoint." in card.text
    assert not (tmp_path / "out" / PLOT_FILE).exists() and PLOT_FILE not in card.text
    assert str(tmp_path) not in card.text


def test_schedule_view_is_a_few_rows():
    from optimum_sparsesched.publish.schedule_view import schedule_view

    levels = [0.4, 0.4, 0.5, 0.6, 0.4, 0.6, 0.6]  # a few levels: one row per level with its blocks
    view = schedule_view(block_rows({f"model.layers.{i}.mlp.up_proj": s for i, s in enumerate(levels)}), [0.4, 0.6])
    assert view.splitlines() == ["Per-block sparsity in [0.400, 0.600]:", "", "| sparsity | decoder blocks |",
                                 "|---|---|", "| 0.40 | 0–1, 4 |", "| 0.50 | 2 |", "| 0.60 | 3, 5–6 |"]
    ramp = {f"model.layers.{i}.mlp.up_proj": 0.4 + 0.01 * i for i in range(30)}  # continuous: 8 groups of blocks
    rows = schedule_view(block_rows(ramp)).splitlines()
    assert rows[:3] == ["| decoder blocks | mean sparsity | range |", "|---|---|---|", "| 0–3 | 0.415 | 0.400–0.430 |"]
    assert len(rows) == 2 + 8 and rows[-1] == "| 28–29 | 0.685 | 0.680–0.690 |"


def test_record_eval_result_validates_replaces_and_keeps_the_fingerprint(compressed, tokenizer):
    from optimum_sparsesched.pipeline.calibration import calibration_windows

    cfg = osp.SparseScheduleConfig(sparsity=0.5, results={"layer_sparsities": {"model.layers.0.mlp.up_proj": 0.5}})
    model = tiny_model("llama")
    windows = calibration_windows(str(CALIBRATION_TEXT), tokenizer, 2, 16, 0)
    before = fingerprint(cfg.fingerprint_options(), windows, model)
    osp.record_eval_result(cfg, 10.0, dataset="wikitext2", split="test", seq_len=128)
    osp.record_eval_result(cfg, 9.0, dataset="wikitext2", split="test", seq_len=128)  # replaces
    osp.record_eval_result(cfg, 11.0, dataset="wikitext2", split="test", seq_len=256)
    assert [r["value"] for r in cfg.results.eval_results] == [9.0, 11.0]
    assert fingerprint(cfg.fingerprint_options(), windows, model) == before  # a result field: resuming is not refused
    for kwargs, name in ((dict(value=float("nan"), dataset="x"), "value"), (dict(value=1.0, dataset=""), "dataset"),
                         (dict(value=1.0, dataset="x", seq_len=0), "seq_len")):
        with pytest.raises(ValueError, match=name):
            osp.record_eval_result(cfg, **kwargs)
    with pytest.raises(ValueError, match="model"):
        osp.record_eval_result(tiny_model("llama"), 1.0, dataset="x")


def test_a_users_readme_is_kept_and_our_card_is_renewed(compressed, tmp_path):
    model, _ = compressed
    out = tmp_path / "out"
    model.save_pretrained(out)
    first = (out / "README.md").read_text()
    model.save_pretrained(out)
    assert (out / "README.md").read_text() == first  # our own card is rewritten (same content)
    (out / "README.md").write_text("# my notes\n")
    model.save_pretrained(out)
    assert (out / "README.md").read_text() == "# my notes\n"


def test_a_failing_card_leaves_the_old_folder_untouched(compressed, tmp_path, monkeypatch):
    import optimum_sparsesched.publish.model_card as mc

    model, _ = compressed
    out = tmp_path / "out"
    model.save_pretrained(out)
    before = files_of(out)

    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(mc, "plot_schedule", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        model.save_pretrained(out)
    assert files_of(out) == before and [p.name for p in tmp_path.iterdir()] == ["out"]


# ---------------------------------------------------------------------------------------------- publishing
def test_push_folder_and_download_every_byte(hub, compressed, tmp_path):
    model, folder = compressed
    url = osp.push_to_hub(folder, "org/tiny-llama-sparse", commit_message="first upload")
    repo = hub.repos["org/tiny-llama-sparse"]
    assert url == f"{hub.url}/org/tiny-llama-sparse/commit/{repo.branches['main']}"
    assert repo.messages[repo.branches["main"]] == "first upload" and TOKEN in hub.tokens
    local = files_of(folder)
    remote = files_of(download(hub, "org/tiny-llama-sparse", tmp_path))
    assert {"README.md", PLOT_FILE, "config.json", "model.safetensors", "tokenizer.json"} <= set(local)
    assert set(remote) == set(local) | {".gitattributes"}
    assert all(remote[name] == data for name, data in local.items())
    check_our_card(Path(download(hub, "org/tiny-llama-sparse", tmp_path)) / "README.md", model)
    osp.push_to_hub(folder, "org/tiny-llama-sparse", revision="dev")  # a new branch
    assert files_of(download(hub, "org/tiny-llama-sparse", tmp_path, revision="dev")) == remote


def test_push_writes_the_card_of_a_folder_without_one(hub, compressed, tmp_path):
    _, folder = compressed
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("README.md", PLOT_FILE))
    osp.push_to_hub(bare, "org/bare")
    published = hub.files("org/bare")
    assert published["README.md"] == (bare / "README.md").read_bytes()  # written into the folder, then uploaded
    assert published[PLOT_FILE].startswith(PNG_MAGIC)
    card = ModelCard.load(bare / "README.md")
    assert "optimum-sparsesched" in card.data.tags and card.data.eval_results[0].metric_value == 42.5
    assert 'from_pretrained("org/bare")' in card.text
    table = [line for line in card.text.splitlines() if re.match(r"\| \d+ \|", line)]
    # parameter counts from the architecture built on the meta device: the same rows as the saved card's
    assert table == [line for line in (folder / "README.md").read_text().splitlines() if re.match(r"\| \d+ \|", line)]


def test_compressed_tensors_export_is_published_with_its_card(hub, tokenizer, tmp_path):
    model = tiny_model("llama", dtype=torch.bfloat16)
    osp.compress(model, osp.SparseScheduleConfig(sparsity=0.5, bits=4, sym=True, export_format="compressed-tensors",
                                                 schedule="uniform", **SMALL), tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "ct")
    bare = tmp_path / "bare"  # the card is rebuilt from config.json's sparse_schedule_config
    shutil.copytree(tmp_path / "ct", bare, ignore=shutil.ignore_patterns("README.md", PLOT_FILE))
    for folder, repo_id in ((tmp_path / "ct", "org/ct"), (bare, "org/ct-bare")):
        osp.push_to_hub(folder, repo_id)
        published = hub.files(repo_id)
        assert published["config.json"] == (folder / "config.json").read_bytes()
        assert "optimum-sparsesched" in ModelCard.load(folder / "README.md").data.tags
        assert published["README.md"] == (folder / "README.md").read_bytes()


def test_save_pretrained_push_to_hub_publishes_our_card(hub, compressed, tmp_path):
    model, _ = compressed
    out = tmp_path / "pushed-by-save"
    model.save_pretrained(out, push_to_hub=True, commit_message="via save_pretrained")
    repo_id = "test-user/pushed-by-save"  # named after the folder, in the token's namespace, as transformers does
    assert hub.files(repo_id)["README.md"] == (out / "README.md").read_bytes()
    assert hub.files(repo_id)[PLOT_FILE] == (out / PLOT_FILE).read_bytes()
    check_our_card(out / "README.md", model)


def test_model_push_to_hub_in_a_fresh_process(hub, compressed, tmp_path):
    model, folder = compressed
    script = textwrap.dedent(f"""
        import optimum_sparsesched
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(r"{folder}")
        print("URL", m.push_to_hub("org/reloaded", tags=["my-tag"]))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env=hub_env(hub, tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"URL {hub.url}/org/reloaded/commit/" in run.stdout
    remote = download(hub, "org/reloaded", tmp_path)
    card = check_our_card(remote / "README.md", model)  # base model carried over from the reloaded folder's card
    assert "my-tag" in card.data.tags and 'from_pretrained("org/reloaded")' in card.text
    assert (remote / PLOT_FILE).read_bytes() == (folder / PLOT_FILE).read_bytes()
    published, saved = load_file(remote / "model.safetensors"), load_file(folder / "model.safetensors")
    assert published.keys() == saved.keys() and all(torch.equal(published[k], saved[k]) for k in saved)


def test_bad_input_fails_before_any_request(hub, compressed, save_tiny, tmp_path, capsys):
    model, folder = compressed
    plain = save_tiny("opt")  # a checkpoint, not a compressed one
    (tmp_path / "empty").mkdir()
    for bad, match in ((tmp_path / "missing", "folder: .* not an existing folder"), (plain, "folder: .*sparse_schedule"),
                       (tmp_path / "empty", "folder: .*config.json"), (None, "folder")):
        with pytest.raises(ValueError, match=match):
            osp.push_to_hub(bad, "org/x")
    for repo_id in ("a/b/c", "", "x" * 200, None):
        with pytest.raises(ValueError, match="repo_id"):
            osp.push_to_hub(folder, repo_id)
    with pytest.raises(ValueError, match="private"):
        osp.push_to_hub(folder, "org/x", private="yes")
    with pytest.raises(ValueError, match="revision"):
        osp.push_to_hub(folder, "org/x", revision="")
    with pytest.raises(ValueError, match="repo_id"):
        model.push_to_hub("not//valid")
    assert main(["push", str(tmp_path / "missing"), "org/x"]) == 2
    assert "folder" in capsys.readouterr().err
    assert hub.requests == []


def test_cli_push_and_optimum_cli(hub, compressed, tmp_path, capsys):
    _, folder = compressed
    assert main(["push", str(folder), "org/cli-model", "--private", "--commit-message", "from the CLI"]) == 0
    repo = hub.repos["org/cli-model"]
    assert repo.private and repo.messages[repo.branches["main"]] == "from the CLI"
    assert capsys.readouterr().out.strip() == f"{hub.url}/org/cli-model/commit/{repo.branches['main']}"
    optimum_cli = [sys.executable, "-m", "optimum.commands.optimum_cli"]  # what the optimum-cli script runs
    help_run = subprocess.run([*optimum_cli, "sparse-schedule", "--help"], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120, env=hub_env(hub, tmp_path))
    assert help_run.returncode == 0, help_run.stderr[-2000:]
    assert all(command in help_run.stdout for command in ("compress", "eval", "push"))
    push_run = subprocess.run([*optimum_cli, "sparse-schedule", "push", str(folder), "org/via-optimum-cli"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300, env=hub_env(hub, tmp_path))
    assert push_run.returncode == 0, push_run.stderr[-3000:]
    assert hub.files("org/via-optimum-cli")["README.md"] == (folder / "README.md").read_bytes()


def test_cli_compress_records_perplexity_in_the_card(save_tiny, tmp_path, capsys):
    path = save_tiny("llama")
    text = tmp_path / "eval.txt"
    text.write_text("some evaluation text, a few words long\n" * 60)
    args = ["compress", str(path), str(tmp_path / "out"), "--num-samples", "2", "--seq-len", "32", "--eval-seq-len",
            "32", "--eval-windows", "2", "--eval-text", str(text), "--dataset", str(CALIBRATION_TEXT)]
    assert main([*args, "--eval-dataset", str(tmp_path / "missing.txt")]) == 2
    assert "--eval-dataset" in capsys.readouterr().err
    assert main([*args, "--eval-dataset", str(text), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    (result,) = ModelCard.load(tmp_path / "out" / "README.md").data.eval_results
    assert result.metric_value == pytest.approx(summary["ppl_after"], abs=1e-3)
    assert result.dataset_name == "eval.txt" and result.metric_args == {"seq_len": 32, "windows": 2}


def test_publish_example_dry_run_and_push(hub, save_tiny, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compress_and_publish", ROOT / "examples" / "compress_and_publish.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    path = save_tiny("llama")
    args = [str(path), "--num-samples", "2", "--seq-len", "32", "--probe-samples", "1", "--eval-windows", "2"]
    assert example.main([*args, "--out", str(tmp_path / "dry"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload" in out and "README.md" in out and PLOT_FILE in out and "model.safetensors" in out
    assert hub.requests == []  # a dry run sends nothing
    card = ModelCard.load(tmp_path / "dry" / "README.md")
    assert card.data.eval_results[0].metric_type == "perplexity"
    assert example.main([*args, "--out", str(tmp_path / "real"), "--repo-id", "org/example",
                         "--endpoint", hub.url]) == 0
    assert hub.files("org/example")["README.md"] == (tmp_path / "real" / "README.md").read_bytes()
    assert torch.is_tensor(next(AutoModelForCausalLM.from_pretrained(tmp_path / "real").parameters()))


def test_offloaded_model_pushes_block_by_block(hub, save_tiny, tmp_path):
    """A model whose blocks accelerate offloaded to disk publishes the same checkpoint as one in memory."""
    path = save_tiny("llama")
    options = dict(sparsity=0.6, bits=4, group_size=32, **SMALL)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "disk",
                  "model.layers.0": "disk", "model.layers.1": "disk"}
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=osp.SparseScheduleConfig(**options),
                                                 device_map=device_map, offload_folder=tmp_path / "offload")
    assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    assert f"{hub.url}/org/offloaded/commit/" in str(model.push_to_hub("org/offloaded"))
    remote = download(hub, "org/offloaded", tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(path, quantization_config=osp.SparseScheduleConfig(**options))
    reference.save_pretrained(tmp_path / "in-memory")
    published, saved = load_file(remote / "model.safetensors"), load_file(tmp_path / "in-memory" / "model.safetensors")
    assert published.keys() == saved.keys() and all(torch.equal(published[k], saved[k]) for k in saved)
    card = ModelCard.load(remote / "README.md")
    assert {"pruned", "int4"} <= set(card.data.tags) and "import optimum_sparsesched" in card.text


def test_compress_checkpoint_streams_a_hub_model(hub, save_tiny, tmp_path, monkeypatch):
    """``compress_checkpoint("org/id", out, cfg)`` downloads a snapshot (config, shards, tokenizer) and streams it;
    the card names the hub id as the base model."""
    from huggingface_hub import HfApi

    path = save_tiny("llama")
    api = HfApi(endpoint=hub.url)
    api.create_repo("org/tiny-source")
    api.upload_folder(repo_id="org/tiny-source", folder_path=str(path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    options = dict(sparsity=0.5, **SMALL)
    osp.compress_checkpoint("org/tiny-source", tmp_path / "out", options)
    reference = AutoModelForCausalLM.from_pretrained(path, quantization_config=osp.SparseScheduleConfig(**options))
    reference.save_pretrained(tmp_path / "in-memory")
    streamed, saved = load_file(tmp_path / "out" / "model.safetensors"), load_file(
        tmp_path / "in-memory" / "model.safetensors")
    assert streamed.keys() == saved.keys() and all(torch.equal(streamed[k], saved[k]) for k in saved)
    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model == "org/tiny-source"
    with pytest.raises(ValueError, match="src: 'org/missing' is neither a local folder nor a hub model id"):
        osp.compress_checkpoint("org/missing", tmp_path / "never", options)
    assert not (tmp_path / "never").exists()


def test_push_uploads_only_the_checkpoints_own_files(hub, compressed, tmp_path, capsys):
    """A ``.env``, notes and subfolders beside the checkpoint stay local unless ``include`` (``--include``) widens
    the upload."""
    _, saved = compressed
    folder = tmp_path / "ckpt"
    shutil.copytree(saved, folder)
    (folder / ".env").write_text("HF_TOKEN=hf_secret\n")
    (folder / "notes.txt").write_text("private notes")
    (folder / "sub").mkdir()
    (folder / "sub" / "model.safetensors").write_bytes(b"an old experiment")
    own = {p.name for p in saved.iterdir() if p.is_file()}
    osp.push_to_hub(folder, "org/own-files")
    assert set(hub.files("org/own-files")) - {".gitattributes"} == own
    osp.push_to_hub(folder, "org/with-notes", include=["notes.txt"])
    assert set(hub.files("org/with-notes")) - {".gitattributes"} == own | {"notes.txt"}
    assert main(["push", str(folder), "org/cli-sub", "--include", "sub/*"]) == 0
    assert set(hub.files("org/cli-sub")) - {".gitattributes"} == own | {"sub/model.safetensors"}
    with pytest.raises(ValueError, match="include"):
        osp.push_to_hub(folder, "org/x", include=[3])


@pytest.mark.parametrize("how", ["offline mode", "no server"])
def test_push_without_the_hub_is_one_line_and_exit_2(how, compressed, tmp_path, monkeypatch, capsys):
    import socket

    import huggingface_hub.constants as hc

    _, folder = compressed
    extra = []
    if how == "no server":  # online, but nothing listens at the endpoint
        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        extra = ["--endpoint", f"http://127.0.0.1:{port}"]
    else:
        monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="push: the Hugging Face Hub at .* cannot be reached"):
        osp.push_to_hub(folder, "org/x", endpoint=extra[1] if extra else None)
    assert main(["push", str(folder), "org/x", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: push: the Hugging Face Hub at ") and "Traceback" not in err
    assert ("offline" in err.lower()) if how == "offline mode" else (f"127.0.0.1:{port}" in err), err
