"""A bridge to lm-evaluation-harness: run its tasks on a model moekit has loaded.

The model object is handed to lm-eval as it is (``HFLM(pretrained=model)``), so a model
compressed in memory is evaluated without saving it first. lm-eval runs offline, always:
its built-in tasks fetch their data from the Hugging Face hub, which moekit never
reaches from here, so they work only when their data is already in the local cache.
Tasks defined by a local YAML with local data files run anywhere; moekit ships one,
``moekit_stdlib_nexttoken`` (see ``moekit.eval.tasks``).

Two steps, so that a bad task name fails before any model is evaluated:
``load_tasks(names)`` finds the tasks and loads their data; ``run_tasks(model,
tokenizer, tasks)`` scores one model on them.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from moekit.errors import MoekitError
from moekit.eval.harness_env import offline, quiet_logging, quiet_progress
from moekit.eval.tasks import shipped_task_names, stage_shipped_tasks
from moekit.progress import phase

INSTALL_HINT = "pip install 'moekit[lmeval]' (in a source checkout: pip install -e '.[lmeval]')"


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as exc:
        raise MoekitError(
            f"running lm-eval tasks needs lm-evaluation-harness, which is not installed ({exc}); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    return lm_eval


@dataclass
class HarnessTasks:
    """Tasks found and checked by `load_tasks`, ready for `run_tasks`."""

    names: list[str]
    task_manager: Any  # lm_eval.tasks.TaskManager


_staging: tempfile.TemporaryDirectory | None = None


def _staged_tasks_dir() -> str:
    """The shipped task YAMLs with absolute data paths, written once per process.

    lm-eval re-reads a task's YAML each time it builds the task, so the folder lives as
    long as the process (TemporaryDirectory removes it at exit).
    """
    global _staging
    if _staging is None:
        _staging = tempfile.TemporaryDirectory(prefix="moekit-tasks-")
        stage_shipped_tasks(Path(_staging.name))
    return _staging.name


@functools.lru_cache(maxsize=4)
def _task_manager(include: tuple[str, ...], defaults: bool) -> Any:
    """lm-eval's task index; with its ~15k built-in YAMLs it takes many seconds, so
    it is built once per process and only when a name is not a local task."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include), include_defaults=defaults)


@dataclass
class HarnessResult:
    """Metrics per task (``acc``, ``acc_stderr``, ...; None where lm-eval gave none).

    ``items`` (with ``per_item=True``): per task, each scored item's ``doc_id``,
    ``target`` and ``scores`` — the log-likelihood of each choice for multiple-choice
    tasks — to see which items a compressed model gets wrong that the original did not.
    """

    tasks: dict[str, dict[str, float | None]]
    samples: dict[str, int]
    limit: int | None
    items: dict[str, list[dict]] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def parse_task_list(text: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]``, in order, without repeats."""
    parts = [text] if isinstance(text, str) else list(text)
    names = [name.strip() for part in parts for name in part.split(",") if name.strip()]
    if not names:
        raise MoekitError(f"no task names given; try --tasks {shipped_task_names()[0]}.")
    return list(dict.fromkeys(names))


def load_tasks(names: str | Sequence[str], *, task_paths: Sequence[str | os.PathLike] = ()) -> HarnessTasks:
    """Find lm-eval tasks by name and load their data, offline.

    Args:
        names: task (or group) names, a list or one comma-separated string.
        task_paths: extra folders of lm-eval task YAMLs (``include_path``); their
            ``data_files`` should be absolute paths (lm-eval resolves relative ones
            against the working directory).

    Raises:
        MoekitError: lm-eval is not installed; a name is unknown; a task needs data
            from the hub that is not in the local cache, or local data that is missing.
    """
    _lm_eval()
    names = parse_task_list(names)
    for folder in task_paths:
        if not Path(folder).is_dir():
            raise MoekitError(f"--task-path {folder} is not a folder; pass a folder that holds task YAML files.")
    include = (_staged_tasks_dir(), *(str(Path(p).resolve()) for p in task_paths))
    with offline(), quiet_logging(), quiet_progress():
        manager = _task_manager(include, defaults=False)
        if any(name not in manager.all_tasks for name in names):
            manager = _task_manager(include, defaults=True)
        unknown = [name for name in names if name not in manager.all_tasks]
        if unknown:
            raise MoekitError(
                f"no lm-eval task named {', '.join(map(repr, unknown))}. moekit ships "
                f"{', '.join(shipped_task_names())}, which run offline; for your own task, pass "
                f"--task-path FOLDER with its YAML and local data files."
            )
        for name in names:  # one at a time, so that an error names its task
            _check_task_loads(name, manager)
    return HarnessTasks(names=names, task_manager=manager)


def _check_task_loads(name: str, manager: Any) -> None:
    from lm_eval.tasks import get_task_dict

    try:
        get_task_dict([name], manager)
    except ConnectionError as exc:  # includes huggingface_hub's OfflineModeIsEnabled
        raise MoekitError(
            f"lm-eval task {name!r} downloads its data from the Hugging Face hub ({exc}), and moekit "
            f"runs lm-eval offline. Use a task defined by a local YAML with local data files "
            f"(--task-path FOLDER), such as the shipped {shipped_task_names()[0]}; or, where there is "
            f"network, load the dataset once with `datasets` so that it is in the local cache."
        ) from None
    except FileNotFoundError as exc:
        raise MoekitError(
            f"the data of lm-eval task {name!r} was not found: {exc}. A task must name local data "
            f"files (absolute paths in `dataset_kwargs.data_files`) or a dataset in the local "
            f"Hugging Face cache; moekit does not download."
        ) from None


def _metric_name(key: str) -> str | None:
    """lm-eval's ``"acc,none"`` -> ``"acc"``; ``"exact_match,strict"`` -> ``"exact_match/strict"``."""
    if "," not in key:
        return None  # "alias", "name", ...: labels, not metrics
    metric, filter_name = key.split(",", 1)
    return metric if filter_name == "none" else f"{metric}/{filter_name}"


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" for a stderr it did not compute
        return None


def run_tasks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: HarnessTasks | str | Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 1000,
    per_item: bool = False,
    progress: bool = True,
) -> HarnessResult:
    """Score ``model`` (a loaded causal LM, left where it is) on lm-eval tasks.

    Args:
        tokenizer: the model's tokenizer; lm-eval scores text, so each model uses its own.
        tasks: from `load_tasks`, or names to load now.
        limit: score only the first N items of each task (quick checks).
        num_fewshot: examples in each prompt (default: each task's own setting).
        bootstrap_iters: resamples for stderrs of metrics with no closed form (0: none).
        per_item: also return each item's scores (`HarnessResult.items`).
        progress: lm-eval's bars (plain lines in a log file) and, between them, a line at
            least every few seconds (`moekit.progress.phase`); none with False.
    """
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    if limit is not None and limit < 1:
        raise MoekitError(f"--limit must be at least 1 (got {limit}).")
    if not isinstance(tasks, HarnessTasks):
        tasks = load_tasks(tasks)
    with offline(), quiet_logging(), quiet_progress(show=progress), \
            phase(f"lm-eval {', '.join(tasks.names)}", enabled=progress, spinner=False):
        # HFLM warns that a model object makes its loading arguments moot; none are passed.
        with quiet_logging("lm_eval.models.huggingface", logging.ERROR):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks.names,
            task_manager=tasks.task_manager,
            limit=limit,
            num_fewshot=num_fewshot,
            bootstrap_iters=bootstrap_iters,
            log_samples=per_item,
        )
    metrics: dict[str, dict[str, float | None]] = {}
    for task, values in out["results"].items():
        metrics[task] = {name: _number(v) for k, v in values.items() if (name := _metric_name(k))}
    samples = {task: int(n["effective"]) for task, n in out.get("n-samples", {}).items()}
    items = None
    if per_item:
        items = {
            task: [{"doc_id": x["doc_id"], "target": x["target"], "scores": _scores(x["filtered_resps"])} for x in rows]
            for task, rows in out["samples"].items()
        }
    return HarnessResult(tasks=metrics, samples=samples, limit=limit, items=items)


def _scores(responses: Any) -> Any:
    """lm-eval's ``[(loglikelihood, is_greedy), ...]`` -> ``[loglikelihood, ...]``;
    generated text and other responses pass through."""
    if isinstance(responses, (list, tuple)) and all(isinstance(r, tuple) for r in responses):
        return [float(r[0]) for r in responses]
    return responses
