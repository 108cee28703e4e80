"""Zero-shot accuracy through lm-evaluation-harness on a tiny local multiple-choice task (a YAML over a local JSON
file, no network), checked against the accuracy computed by hand from the model's log-likelihoods; recorded into
the model card's model-index; the CLI's `eval --tasks`."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import CALIBRATION_TEXT, SMALL, tiny_model

pytest.importorskip("lm_eval")

import optimum_sparsesched as osp  # noqa: E402
from optimum_sparsesched.cli import main  # noqa: E402

DOCS = [
    {"question": "The sky on a clear day is", "choices": ["blue", "green", "loud", "a chair"], "answer": 0},
    {"question": "Ice is made of frozen", "choices": ["fire", "water", "sand"], "answer": 1},
    {"question": "A week has seven", "choices": ["days", "cats", "rivers"], "answer": 0},
    {"question": "The opposite of hot is", "choices": ["warm", "tall", "cold"], "answer": 2},
    {"question": "Birds can usually", "choices": ["fly", "read", "melt", "sing loudly at night"], "answer": 0},
    {"question": "Two plus two equals", "choices": ["three", "four", "five"], "answer": 1},
    {"question": "The capital of France is", "choices": ["Rome", "Madrid", "Paris", "Berlin"], "answer": 2},
    {"question": "Water boils at a high", "choices": ["temperature", "speed"], "answer": 0},
]


@pytest.fixture
def task_dir(tmp_path):
    """A multiple-choice lm-eval task `tiny_mc` over a local JSON-lines file."""
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return tmp_path


def by_hand(model, tokenizer, docs) -> tuple[float, float]:
    """acc and acc_norm as lm-eval defines them: log p(" " + choice | question) summed over the choice's tokens
    (the pair tokenized whole and split after the question's tokens); acc_norm divides by the choice's length in
    characters."""
    right = right_norm = 0
    for doc in docs:
        context = tokenizer(doc["question"]).input_ids
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + " " + choice).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
            scores.append(sum(logp[t - 1, whole[t]].item() for t in range(len(context), len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
        norm = [s / len(c) for s, c in zip(scores, doc["choices"])]
        right_norm += max(range(len(norm)), key=norm.__getitem__) == doc["answer"]
    return right / len(docs), right_norm / len(docs)


def test_zero_shot_matches_the_hand_computed_accuracy(tokenizer, task_dir):
    model = tiny_model("llama", seed=3)
    got = osp.zero_shot(model, tokenizer, ["tiny_mc"], task_paths=[task_dir], batch_size=3)
    acc, acc_norm = by_hand(model, tokenizer, DOCS)
    result = got["tiny_mc"]
    assert result.metrics["acc"] == pytest.approx(acc) and result.metrics["acc_norm"] == pytest.approx(acc_norm)
    assert (result.samples, result.num_fewshot, result.split) == (len(DOCS), 0, "test")
    limited = osp.zero_shot(model, tokenizer, "tiny_mc", task_paths=[task_dir], limit=3, batch_size=1)["tiny_mc"]
    assert limited.samples == 3 and limited.metrics["acc"] == pytest.approx(by_hand(model, tokenizer, DOCS[:3])[0])


def test_zero_shot_bad_input(tokenizer, task_dir):
    model = tiny_model("llama")
    for kwargs, name in ((dict(tasks=[]), "tasks"), (dict(tasks=["tiny_mc"], limit=0), "limit"),
                         (dict(tasks=["tiny_mc"], num_fewshot=-1), "num_fewshot"),
                         (dict(tasks=["tiny_mc"], batch_size=0), "batch_size"),
                         (dict(tasks=["tiny_mc"], task_paths=[task_dir / "missing"]), "task_paths")):
        with pytest.raises(ValueError, match=name):
            osp.zero_shot(model, tokenizer, **kwargs)
    with pytest.raises(ValueError, match="not lm-eval tasks"):
        osp.zero_shot(model, tokenizer, ["no_such_task"], task_paths=[task_dir], include_default_tasks=False)


def test_zero_shot_is_recorded_in_the_model_card(tokenizer, task_dir, tmp_path):
    model = tiny_model("llama")
    osp.compress(model, osp.SparseScheduleConfig(sparsity=0.5, schedule="uniform", **SMALL), tokenizer=tokenizer)
    results = osp.zero_shot(model, tokenizer, ["tiny_mc"], task_paths=[task_dir])
    osp.record_zero_shot(model, results)
    model.save_pretrained(tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    recorded = {(r.metric_type, r.dataset_name): r for r in card.data.eval_results}
    assert recorded[("acc", "tiny_mc")].metric_value == pytest.approx(results["tiny_mc"].metrics["acc"])
    assert recorded[("acc_norm", "tiny_mc")].metric_args == {"num_fewshot": 0, "samples": len(DOCS)}
    assert "| acc |" in card.text and "0-shot, 8 documents" in card.text
    # the saved checkpoint kept compact in memory (run_compressed) scores as the model in memory
    from conftest import load_run_compressed
    from optimum_sparsesched.formats.compressed_linear import CompressedLinear

    compact = load_run_compressed(tmp_path / "out")
    assert any(isinstance(m, CompressedLinear) for m in compact.modules())
    again = osp.zero_shot(compact, tokenizer, ["tiny_mc"], task_paths=[task_dir])["tiny_mc"]
    assert again.metrics == results["tiny_mc"].metrics


def test_cli_eval_tasks(save_tiny, task_dir, capsys):
    path = save_tiny("llama", seed=3)
    assert main(["eval", str(path), "--tasks", "tiny_mc", "--task-path", str(task_dir), "--json",
                 "--seq-len", "64", "--max-windows", "2"]) == 0
    got = json.loads(capsys.readouterr().out)
    from transformers import AutoTokenizer

    acc, acc_norm = by_hand(tiny_model("llama", seed=3), AutoTokenizer.from_pretrained(path), DOCS)
    assert got["tasks"]["tiny_mc"]["acc"] == pytest.approx(acc)
    assert got["tasks"]["tiny_mc"]["acc_norm"] == pytest.approx(acc_norm)
    assert main(["eval", str(path), "--tasks", "tiny_mc", "--task-path", str(task_dir / "nope")]) == 2
    assert "--task-path" in capsys.readouterr().err


def hub_task(folder):
    """A task `hub_mc` whose data is on the Hub only (out of reach in the tests)."""
    yaml = folder / "hub_mc.yaml"
    folder.mkdir()
    yaml.write_text("""task: hub_mc
dataset_path: optimum-sparsesched-tests/not-in-any-cache
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: acc
""")
    return folder


def test_tasks_whose_data_is_out_of_reach_are_one_line_and_exit_2(tokenizer, save_tiny, tmp_path, capsys):
    """lm-eval downloads each task's dataset from the Hub; offline (the tests run with HF_DATASETS_OFFLINE=1) that
    is one ConnectionError naming the tasks, and `eval --tasks` prints it as one line, exit 2."""
    yaml = hub_task(tmp_path / "tasks") / "hub_mc.yaml"
    with pytest.raises(ConnectionError, match="tasks: the data of hub_mc could not be loaded: the Hugging Face Hub"):
        osp.zero_shot(tiny_model("llama"), tokenizer, ["hub_mc"], task_paths=[yaml.parent], limit=2)
    path = save_tiny("llama")
    capsys.readouterr()
    assert main(["eval", str(path), "--seq-len", "32", "--max-windows", "1", "--tasks", "hub_mc", "--task-path",
                 str(yaml.parent), "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: tasks: the data of hub_mc") and "Traceback" not in "\n".join(err), err


COMPRESS = ["--num-samples", "2", "--seq-len", "32", "--probe-samples", "1", "--eval-seq-len", "32",
            "--eval-windows", "2", "--dataset", str(CALIBRATION_TEXT), "--schedule", "uniform", "--sparsity", "0.5"]


@pytest.mark.parametrize("options, flag", [
    (["--tasks", "no_such_task"], "--tasks: ['no_such_task'] are not lm-eval tasks"),
    (["--tasks", "tiny_mc", "--limit", "0"], "--limit: 0 is not valid"),
    (["--tasks", "tiny_mc", "--limit", "-1"], "--limit: -1 is not valid"),
    (["--tasks", "tiny_mc", "--num-fewshot", "-1"], "--num-fewshot: -1 is not valid"),
    (["--tasks", "tiny_mc", "--batch-size", "0"], "--batch-size: 0 is not valid"),
])
@pytest.mark.parametrize("command", ["compress", "eval"])
def test_bad_task_options_are_refused_before_the_model_is_loaded(save_tiny, task_dir, tmp_path, capsys, options,
                                                                 flag, command, monkeypatch):
    """A typo in --tasks (or a bad --limit ...) is refused before any model is loaded: never after hours of
    compression, and nothing is written to OUT."""
    import optimum_sparsesched.cli.commands as commands

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the task options were checked")

    monkeypatch.setattr(commands, "load_model", never)
    path = save_tiny("llama")
    out = tmp_path / "out"
    args = ["compress", str(path), str(out), *COMPRESS] if command == "compress" else ["eval", str(path)]
    capsys.readouterr()
    assert main([*args, *options, "--task-path", str(task_dir)]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err, err
    assert not out.exists()


def test_compressed_model_is_saved_when_the_tasks_after_compression_fail(save_tiny, tmp_path, capsys):
    """The tasks' data out of reach is only known when lm-eval loads it, after the compression: the compressed
    model is saved to OUT all the same (without the card's accuracies), and the error is one line, exit 2."""
    tasks = hub_task(tmp_path / "tasks")
    path = save_tiny("llama")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["compress", str(path), str(out), *COMPRESS, "--tasks", "hub_mc", "--task-path", str(tasks),
                 "--limit", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: tasks: the data of hub_mc") and "Traceback" not in "\n".join(err), err
    assert any(f"saved the compressed model to {out}" in line for line in err), err
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    weights = [m.weight for n, m in reloaded.named_modules() if n.endswith("mlp.down_proj")]
    assert weights and all(float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.01) for w in weights)
