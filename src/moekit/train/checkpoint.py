"""Training checkpoints: everything needed to continue bit-for-bit, and nothing pickled.

A checkpoint folder ``step-000123/`` holds

- ``model.safetensors``: every parameter and persistent buffer (router correction
  biases included), fp32;
- ``optimizer.safetensors``: the AdamW moments and step counts, ``state.<i>.<name>``;
- ``rng.safetensors``: torch's CPU generator state;
- ``trainer_state.json``: step, data position, optimizer hyper-parameters, the log so far.

Tensors go through safetensors and metadata through JSON, never ``torch.load`` of a
pickle: loading a checkpoint cannot execute code. Folders are written under a temporary
name and renamed when complete, so an interruption never leaves a half checkpoint that
resume would pick.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from moekit.errors import MoekitError
from moekit.io.save import _usual_permissions

STATE_FILE = "trainer_state.json"


def save_checkpoint(
    directory: Path, *, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``directory/step-{step:06d}`` atomically and keep only the newest ``keep``."""
    final = directory / f"step-{step:06d}"
    tmp = directory / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    tensors, groups = _flatten_optimizer(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    save_file({"torch_cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step, "param_groups": groups}))
    _usual_permissions(tmp)  # safetensors writes 0600
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step-*") if (p / STATE_FILE).is_file())


def latest_state(directory: Path) -> dict[str, Any] | None:
    """The trainer state of the newest complete checkpoint in ``directory`` (None when there
    is none), read without loading a tensor: enough to check a resume before any work."""
    checkpoints = list_checkpoints(directory)
    return _read_state(checkpoints[-1]) if checkpoints else None


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MoekitError(f"checkpoint {path} is unreadable ({exc}); delete it to resume from an older one.") from None


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG in place from ``path``; return the trainer state."""
    state = _read_state(path)
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if unexpected or [m for m in missing if not _tied(model, m)]:
            raise MoekitError(
                f"checkpoint {path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                "resume with the config the run started with, or use a fresh --out."
            )
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                                        state["param_groups"]))
        torch.set_rng_state(load_file(str(path / "rng.safetensors"))["torch_cpu"])
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise MoekitError(f"checkpoint {path} is unreadable ({exc}); delete it to resume from an older one.") from None
    return state


def _tied(model: nn.Module, name: str) -> bool:
    # save_model drops one name of each tied pair (lm_head.weight when tied to embeddings).
    return bool(getattr(model.config, "tie_word_embeddings", False)) and name == "lm_head.weight"


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {
        f"state.{index}.{name}": value.detach().clone().contiguous()
        for index, entry in sd["state"].items()
        for name, value in entry.items()
        if isinstance(value, torch.Tensor)
    }
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}
