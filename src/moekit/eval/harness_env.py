"""How lm-eval runs inside moekit: offline, and without noise in the user's output.

lm-eval and the hub libraries under it read their offline switches once, at import, log
every step at INFO, draw tqdm bars even into files, and ask git for a commit hash with
git's stderr open. Each context manager here changes one of those for the duration of a
call and puts it back after.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

# Module-level flags that the hub libraries read once, at import; the environment
# variables alone would not reach modules that are already imported.
_OFFLINE_FLAGS = (
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
    ("evaluate.config", "HF_EVALUATE_OFFLINE"),
)
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE")


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hub access off (environment and the libraries' import-time flags), then restored."""
    saved_env = {name: os.environ.get(name) for name in _OFFLINE_ENV}
    saved_flags = []
    os.environ.update({name: "1" for name in _OFFLINE_ENV})
    try:
        for module_name, attribute in _OFFLINE_FLAGS:
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # e.g. `evaluate` is optional for lm-eval
                continue
            if hasattr(module, attribute):
                saved_flags.append((module, attribute, getattr(module, attribute)))
                setattr(module, attribute, True)
        yield
    finally:
        for module, attribute, value in saved_flags:
            setattr(module, attribute, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def quiet_logging(name: str = "lm_eval", level: int = logging.WARNING) -> Iterator[None]:
    """lm-eval logs every step at INFO; keep its warnings (truncation, say) only."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


@contextlib.contextmanager
def quiet_progress(show: bool = True) -> Iterator[None]:
    """lm-eval and datasets draw tqdm bars even when stderr is a file, where every redraw
    is a carriage return in the log, and lm-eval runs ``git describe`` for a commit hash
    with git's stderr open (``fatal: not a git repository`` outside a repository). Here
    datasets' bars are off; lm-eval's are drawn on a terminal and, in a file, become
    moekit's plain lines (`moekit.progress.PlainLines`, `STATUS_EVERY` seconds apart), or
    are off with ``show=False``; git's complaint is kept out of the output; everything is
    put back after."""
    import tqdm
    from datasets.utils import logging as datasets_logging

    from moekit.progress import STATUS_EVERY, PlainLines

    def terminal_only(*args: Any, **kwargs: Any) -> Any:
        file = kwargs.get("file") or sys.stderr
        if not show:
            kwargs["disable"] = True
        elif not kwargs.get("disable") and not (hasattr(file, "isatty") and file.isatty()):
            kwargs.update(file=PlainLines(), mininterval=STATUS_EVERY,
                          bar_format="{desc} {n_fmt}/{total_fmt} {rate_fmt}")
            if len(args) < 2 and not kwargs.get("desc"):  # a bar of lm-eval's without a name (building requests)
                kwargs["desc"] = "lm-eval"
        return tqdm.tqdm(*args, **kwargs)

    def commit_hash_quietly() -> str | None:
        from lm_eval.loggers.utils import get_commit_from_path

        try:  # lm-eval's own call, with git's stderr captured instead of printed
            return subprocess.run(["git", "describe", "--always"], capture_output=True, text=True,  # noqa: S607
                                  check=True).stdout.strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return get_commit_from_path(os.getcwd())

    # Imported first: the modules whose names are replaced must be there to be replaced.
    evaluator = importlib.import_module("lm_eval.evaluator")
    importlib.import_module("lm_eval.models.huggingface")
    replaced = [(module, "tqdm", terminal_only) for name, module in list(sys.modules.items())
                if name.startswith("lm_eval") and getattr(module, "tqdm", None) is tqdm.tqdm]
    if hasattr(evaluator, "get_git_commit_hash"):
        replaced.append((evaluator, "get_git_commit_hash", commit_hash_quietly))
    saved = [(module, name, getattr(module, name)) for module, name, _ in replaced]
    bars_were_on = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    for module, name, value in replaced:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        if bars_were_on:
            datasets_logging.enable_progress_bar()
