"""Does a checkpoint's config.json describe its weights? The model its config builds, on
PyTorch's ``meta`` device (shapes only, no memory), against the safetensors headers.

Every model a command reads goes through this before any weight is read: streamed
(`moekit.io.layered`) or loaded whole (`moekit.io.load.load`). Without it, a config whose
expert count (or any size) disagrees with the tensors fails inside transformers with a
traceback after a report of every mismatched tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from moekit.errors import MoekitError


def checked_skeleton(folder: Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                     **from_config):
    """(model on ``meta``, the `Checkpoint`, whether moekit's own layout) for
    ``folder``: the model as its config.json describes it, cut to moekit's per-layer expert
    counts and layout where the config records them. Every tensor is checked against it
    (`check_shapes`): a mismatch is refused naming the file and the tensor."""
    from transformers import AutoConfig

    from moekit.arch.edit import skeleton as layout_skeleton
    from moekit.arch.layout import PER_LAYER_KEY, nonstandard_keys
    from moekit.io.checkpoint import Checkpoint

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    checkpoint = Checkpoint(folder)
    if checkpoint.packed:  # read decompressed (`Checkpoint`): the skeleton is the dense model
        config.quantization_config = None
        del config.quantization_config
    # moekit's format: each layer's expert count, top-k, dropped sublayer, factors
    model = layout_skeleton(config, dtype=dtype, trust_remote_code=trust_remote_code, **from_config)
    model.tie_weights()  # before the checks: a tied head is not stored under its own name
    native = (bool(getattr(config, PER_LAYER_KEY, None)) or bool(nonstandard_keys(config))
              or (Path(folder) / "moekit.json").is_file())
    check_shapes(model, checkpoint, native=native)
    return model, checkpoint, native


def check_shapes(model: nn.Module, checkpoint, *, native: bool) -> None:
    """Every checkpoint tensor against ``model``'s, before anything is read.

    Only possible without conversions (a fused tensor is built from many checkpoint
    tensors); with them the per-expert shapes are checked against the fused ones."""
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    for name, entry in checkpoint.tensors.items():
        shape = expected.get(name)
        if shape is None and not native:
            shape = _fused_shape(name, expected)
        if shape is not None and shape != entry.shape:
            raise MoekitError(f"{entry.file}: tensor {name!r} has shape {entry.shape} but the config says "
                              f"{shape}; the config.json does not describe these weights.")
    if native:
        stored = set(checkpoint.tensors)
        tied = {name for group in tied_groups(model) if stored & set(group) for name in group}
        missing = sorted(set(expected) - stored - tied)
        if missing:
            raise MoekitError(f"{checkpoint.folder} has no tensor {missing[0]!r}"
                              f"{f' (nor {len(missing) - 1} others)' if len(missing) > 1 else ''}; "
                              "the checkpoint is incomplete.")


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one tensor (a head tied to the embeddings), each group in order."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


def _fused_shape(name: str, expected: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The shape one per-expert checkpoint tensor must have, from the fused parameter it
    becomes part of (None when ``name`` is not a per-expert tensor this knows)."""
    match = _PER_EXPERT.match(name)
    if match is None:
        return None
    prefix, proj = match.group("prefix"), match.group("proj")
    if proj in ("down_proj", "w2"):
        fused = expected.get(f"{prefix}.down_proj")
        return None if fused is None else tuple(fused[1:])
    fused = expected.get(f"{prefix}.gate_up_proj")
    return None if fused is None else (fused[1] // 2, fused[2])
