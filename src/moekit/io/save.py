"""Saving standard checkpoints, never half-written and never over the user's files.

Everything is written into a hidden temporary folder next to the destination and
renamed into place only when complete, so an interrupted run leaves no output folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moekit.arch.layout import PER_LAYER_KEY, nonstandard_keys
from moekit.arch.storage import saved_tensors, storage_dtypes
from moekit.errors import MoekitError
from moekit.io.outputs import check_output, missing_folders, remove_empty, writing
from moekit.progress import silence_transformers_bars

OUTPUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def output_dtype(choice: str, source: torch.dtype) -> torch.dtype:
    """What an output stores: ``auto`` keeps the ``source`` checkpoint's dtype (a bf16 model
    stays bf16, never doubling its size), or one of `OUTPUT_DTYPES` by name.

    Raises:
        MoekitError: an unknown name.
    """
    if choice == "auto":
        return source
    if choice not in OUTPUT_DTYPES:
        raise MoekitError(f"dtype {choice!r} is not one of auto, {', '.join(OUTPUT_DTYPES)}.")
    return OUTPUT_DTYPES[choice]


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes ``out_dir`` when the block succeeds.

    ``replace=True`` is for folders moekit itself owns (a training run's ``model/``): an
    existing ``out_dir`` is swapped for the new one only once the new one is complete.
    A write that fails in the block (a full disk) removes the temporary folder and the
    folders made for it, and raises `WriteFailed` (`moekit.io.outputs.writing`).

    Raises:
        MoekitError: ``out_dir`` cannot be created (`moekit.io.outputs.check_output`), or
            already exists and ``replace`` is False (moekit never writes into a user's folder).
    """
    out = Path(out_dir).expanduser().resolve() if replace else check_output(out_dir)
    made = missing_folders(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"

    def removed() -> str:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty(made)
        return "The partial output was removed."

    try:
        with writing(out, partial=[tmp], on_failure=removed):
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            yield tmp
            _usual_permissions(tmp)
            if out.exists():
                os.replace(out, old)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomically(path: Path, data: Any, *, indent: int = 1) -> Path:
    """Write ``data`` as JSON to ``path`` through a temporary file renamed over it, so a
    reader (a resumed run, say) sees the old file or the new one, never half of one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=indent))
    partial.replace(path)
    return path


def _usual_permissions(folder: Path) -> None:
    """Give the files the modes the user's umask asks for. safetensors writes through a
    private temporary file, so its ``.safetensors`` come out 0600: unreadable to the
    colleagues a model folder on a shared machine is usually meant for."""
    umask = _current_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _current_umask() -> int:
    # Linux reports it without changing it; os.umask can only read it by setting it, which
    # races with other threads creating files.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def check_standard(model: nn.Module) -> None:
    """Refuse what plain transformers cannot load: different expert counts per layer."""
    per_layer = getattr(model.config, PER_LAYER_KEY, None)
    others = [key for key in nonstandard_keys(model.config) if key != PER_LAYER_KEY]
    if others:
        raise MoekitError(
            f"the model has {', '.join(others)} in its config (a top-k per layer, MoE sublayers removed, or factored "
            f"experts), which no standard transformers config can say; write it in moekit's format with "
            f"moekit.io.save.write_checkpoint (moekit.load restores it), or make it uniform (factored experts: "
            f"moekit.materialize(model) multiplies them back)."
        )
    if per_layer:
        raise MoekitError(
            f"the model keeps different numbers of experts per layer ({per_layer}); a standard "
            f"transformers checkpoint holds one count for all layers. Keep the same number in every "
            f"layer to save a standard checkpoint."
        )


@torch.no_grad()
def round_for_storage(model: nn.Module, dtype: torch.dtype) -> None:
    """Round tensors in place to the precision they will be stored in (`storage_dtypes`),
    keeping their compute dtype, so that what is evaluated is what is saved."""
    plan = storage_dtypes(model, dtype)
    for name, t in saved_tensors(model):
        if name in plan and plan[name] != t.dtype:
            t.copy_(t.to(plan[name]))


@torch.no_grad()
def cast_for_storage(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Convert tensors in place to their storage dtypes (`storage_dtypes`); returns ``model``."""
    plan = storage_dtypes(model, dtype)
    for name, t in saved_tensors(model):
        if name in plan:
            t.data = t.data.to(plan[name])
    return model


def write_standard(model: nn.Module, folder: Path) -> None:
    """Write a standard checkpoint into the existing ``folder``."""
    check_standard(model)
    silence_transformers_bars()
    model.save_pretrained(folder)  # transformers 5 writes safetensors only


def write_checkpoint(model: nn.Module, folder: Path) -> str:
    """Write ``model`` into the existing ``folder`` as a standard checkpoint, or in moekit's
    non-uniform format when its layers keep different numbers of experts (which a standard
    checkpoint cannot express). Returns the format written: "standard" or "moekit-nonuniform"."""
    if nonstandard_keys(model.config):
        from moekit.io.nonuniform import write_nonuniform

        write_nonuniform(model, folder)
        return "moekit-nonuniform"
    write_standard(model, folder)
    return "standard"


def save(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer: Any = None,
         dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``) as a standard safetensors checkpoint that plain
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads without moekit.

    Args:
        dtype: store tensors in this dtype (with transformers' fp32 exceptions, see
            `storage_dtypes`), e.g. ``torch.bfloat16`` for a model loaded from a bf16
            checkpoint; None stores them as they are. The model's own tensors are rounded
            to it in place and keep their compute dtype, so the model in memory is exactly
            what was saved.

    Returns:
        The output folder.
    """
    check_standard(model)
    with atomic_dir(out_dir) as tmp:
        if dtype is None:
            write_standard(model, tmp)
        else:
            compute = {name: t.dtype for name, t in saved_tensors(model)}
            cast_for_storage(model, dtype)
            try:
                write_standard(model, tmp)
            finally:
                for name, t in saved_tensors(model):
                    t.data = t.data.to(compute[name])
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir).expanduser().resolve()
