"""Edit a tiny model of every family, save it, and reload all of them in one process that
never imports moekit (`plain_reload.py`): the proof that an edit writes standard checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import moekit
from moekit.zoo.tiny import tiny_model
from tests.conftest import FAMILIES


def edit_save_reload(
    root: Path, edit: Callable[[nn.Module], None], ids: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(in-memory logits, plain-transformers logits)`` by family for ``ids`` after ``edit``."""
    in_memory, folders = {}, []
    for family in FAMILIES:
        model = tiny_model(family)
        edit(model)
        with torch.no_grad():
            in_memory[family] = model(ids).logits
        folders.append(moekit.save(model, root / family))
    reloaded = plain_logits(root, folders, ids)
    return in_memory, dict(zip(FAMILIES, reloaded, strict=True))


def plain_logits(root: Path, folders: list[Path], ids: torch.Tensor, *, dtype: str = "float32") -> list[torch.Tensor]:
    """Logits for ``ids`` of each folder loaded by plain transformers (``dtype``: float32,
    bfloat16, or auto: the checkpoint's), in one process that never imports moekit
    (`plain_reload.py`); ``root`` holds the exchanged files. Fails when the process fails,
    or when loading or running a folder gives any warning (transformers' or another
    library's logging, Python warnings), naming the folder and the warning."""
    save_file({"input_ids": ids}, root / "ids.safetensors")
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "plain_reload.py"), "--dtype", dtype, str(root / "ids.safetensors"),
         str(root / "logits.safetensors"), *map(str, folders)],
        capture_output=True, text=True, check=False,
        env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},  # same numerics as here
    )
    said = "\n".join(line for line in done.stderr.splitlines() if line.strip())
    assert done.returncode == 0, f"plain transformers (exit {done.returncode}):\n{said[-4000:]}"
    reloaded = load_file(root / "logits.safetensors")
    return [reloaded[str(i)] for i in range(len(folders))]
