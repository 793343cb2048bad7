"""The dtype each parameter is stored in: models compute in fp32 on CPU, but a checkpoint
keeps its own precision, and moekit writes (and counts, and evaluates) what it stores."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def saved_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of everything a checkpoint holds: parameters and persistent buffers
    (DeepSeek-V3's correction bias is one), each tied tensor once."""
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield name, tensor


def storage_dtypes(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype each floating-point tensor of `saved_tensors` is stored in when the
    checkpoint is ``dtype``.

    Everything is ``dtype`` except what the model class keeps in fp32 at that precision, as
    transformers does when it loads one (``_keep_in_fp32_modules_strict``, e.g. DeepSeek-V3's
    router weight and correction bias, in bf16 and fp16; ``_keep_in_fp32_modules`` in fp16):
    rounding a correction bias to bf16 would change which experts win.
    """
    keep: set[str] = set()
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return {name: torch.float32 if any(k in name for k in keep) else dtype
            for name, t in saved_tensors(model) if t.is_floating_point()}


def to_meta(module: nn.Module) -> None:
    """Replace ``module``'s parameters and persistent buffers by ``meta`` tensors of the same
    shapes (freeing their memory); non-persistent buffers (rotary tables), which are not in
    checkpoints, stay."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.device.type != "meta":
                sub._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                     requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and name not in sub._non_persistent_buffers_set and buffer.device.type != "meta":
                sub._buffers[name] = torch.empty_like(buffer, device="meta")
