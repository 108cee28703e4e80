"""Zero-shot (or few-shot) accuracy with lm-evaluation-harness, on the model in memory.

:func:`zero_shot` wraps the model object itself in lm-eval's ``HFLM`` (``HFLM(pretrained=model, tokenizer=...)``),
so a compressed model — including one reloaded from a compact checkpoint — is evaluated as it is, and calls
``lm_eval.simple_evaluate``. For a multiple-choice task each choice's log-likelihood given the context is
``Σ log p(continuation tokens)``; ``acc`` is the fraction of documents whose most likely choice is the gold one,
``acc_norm`` the same with each log-likelihood divided by the choice's length in characters (lm-eval's
definitions). Tasks are lm-eval's (``hellaswag``, ``arc_easy``, ``piqa``, ...: their data comes from the Hub) or
task YAMLs in ``task_paths`` (which may read local files: ``dataset_path: json`` with ``data_files``).

Needs the ``lm-eval`` package: ``pip install "optimum-sparsesched[eval]"``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..logs import quiet
from ..network import unreachable

#: lm-eval's metric keys (``"acc,none"``) that :func:`zero_shot` reports
METRICS = ("acc", "acc_norm")


@dataclass(frozen=True)
class TaskResult:
    """Accuracies of one task (``metrics``: ``{"acc": 0.61, "acc_norm": 0.64}``), over ``samples`` documents with
    ``num_fewshot`` examples in the prompt; ``split``: the split lm-eval evaluated."""

    task: str
    metrics: dict[str, float]
    samples: int
    num_fewshot: int
    split: str | None = None
    stderr: dict[str, float] = field(default_factory=dict)


def _tasks(tasks: str | Iterable[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    if not names or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"tasks: {tasks!r} is not valid; allowed: lm-eval task names, e.g. ['hellaswag', "
                         "'arc_easy'] or 'hellaswag,arc_easy'")
    return names


def _positive(name: str, value: Any, none_ok: bool = True) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: {value!r} is not valid; allowed: {'None or ' if none_ok else ''}a positive integer")


def check_zero_shot(tasks: str | Sequence[str], *, limit: int | None = None, num_fewshot: int = 0,
                    batch_size: int = 8, task_paths: Sequence[str | os.PathLike] = (),
                    include_default_tasks: bool | None = None) -> tuple[list[str], Any]:
    """Validate :func:`zero_shot`'s options and index the tasks -> ``(names, task_manager)``, raising
    ``ValueError`` (naming the option and what is allowed) for a bad option or a task lm-eval does not know, and
    ``ImportError`` without lm-eval. Runs no model: the CLI calls it before compressing, so that a typo in a task
    name is refused before hours of work rather than after them (indexing lm-eval's own tasks takes seconds)."""
    names = _tasks(tasks)
    _positive("limit", limit)
    _positive("batch_size", batch_size, none_ok=False)
    if isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0:
        raise ValueError(f"num_fewshot: {num_fewshot!r} is not valid; allowed: an integer >= 0")
    try:
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as exc:
        raise ImportError("zero_shot needs lm-evaluation-harness: pip install 'optimum-sparsesched[eval]'") from exc
    for path in task_paths:
        if not os.path.exists(path):
            raise ValueError(f"task_paths: {os.fspath(path)!r} does not exist; allowed: folders or YAML files of "
                             "lm-eval task configs")
    paths = tuple(os.path.abspath(os.fspath(p)) for p in task_paths)
    with quiet("lm_eval"):  # lm-eval logs every request builder and cache step
        manager = None
        if paths and not include_default_tasks:
            manager = _task_manager(paths, False)
            if include_default_tasks is None and any(t not in manager.all_tasks for t in names):
                manager = None
        if manager is None:
            manager = _task_manager(paths, include_default_tasks is not False)
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"tasks: {unknown} are not lm-eval tasks"
                         + (" in task_paths" if include_default_tasks is False else "")
                         + "; see `lm-eval ls tasks` or pass task_paths")
    return names, manager


def _task_manager(paths: tuple[str, ...], include_defaults: bool) -> Any:
    """lm-eval's task index of ``paths`` (and of its own tasks with ``include_defaults``; about 5 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=include_defaults)


def zero_shot(model: Any, tokenizer: Any, tasks: str | Sequence[str], *, limit: int | None = None,
              num_fewshot: int = 0, batch_size: int = 8, task_paths: Sequence[str | os.PathLike] = (),
              include_default_tasks: bool | None = None, seed: int = 0) -> dict[str, TaskResult]:
    """Accuracy of ``model`` on each lm-eval task -> ``{task: TaskResult}``.

    ``limit``: at most this many documents per task (None: all); ``num_fewshot``: examples in each prompt (0:
    zero-shot); ``batch_size``: documents per forward; ``task_paths``: extra folders or YAML files of task configs;
    ``include_default_tasks``: also index lm-eval's own tasks (indexing them takes tens of seconds; None: only when
    a task is not in ``task_paths``); ``seed``: lm-eval's sampling seeds (few-shot example choice). The options are
    checked by :func:`check_zero_shot` first."""
    names, manager = check_zero_shot(tasks, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                                     task_paths=task_paths, include_default_tasks=include_default_tasks)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with quiet("lm_eval"):  # lm-eval logs every request builder and cache step
        was_training = model.training
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=0,
                                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                          fewshot_random_seed=seed)
        except Exception as exc:  # a task's dataset out of reach: one line naming it
            raise _data_unreachable(exc, names) from None
        if was_training:
            model.train()
    return {task: _result(task, out, num_fewshot) for task in names}


def _data_unreachable(exc: Exception, names: list[str]) -> Exception:
    """``exc`` as one ``ConnectionError`` naming the tasks when it says their data could not be downloaded (lm-eval
    loads each task's dataset from the Hub), else ``exc`` itself."""
    reason = unreachable(exc)
    if reason is None:
        return exc
    return ConnectionError(f"tasks: the data of {', '.join(names)} could not be loaded: the Hugging Face Hub cannot "
                           f"be reached ({reason}); lm-eval downloads each task's dataset once (then "
                           "HF_DATASETS_OFFLINE=1 reads its cache), or give local task configs with task_paths")


def _result(task: str, out: dict[str, Any], num_fewshot: int) -> TaskResult:
    row = out["results"][task]
    metrics = {m: float(row[f"{m},none"]) for m in METRICS if isinstance(row.get(f"{m},none"), (int, float))}
    if not metrics:
        raise ValueError(f"tasks: {task!r} reports no accuracy (its metrics are "
                         f"{sorted(k for k in row if ',' in k)}); zero_shot reports {METRICS}")
    stderr = {m: float(row[f"{m}_stderr,none"]) for m in metrics
              if isinstance(row.get(f"{m}_stderr,none"), (int, float))}
    samples = int(out.get("n-samples", {}).get(task, {}).get("effective", 0))
    config = out.get("configs", {}).get(task, {})
    split = config.get("test_split") or config.get("validation_split")
    return TaskResult(task, metrics, samples, num_fewshot, split, stderr)
