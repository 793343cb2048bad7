"""Where an offloaded model's routed experts are read from on a miss: the slow tier.

- ``disk``: the checkpoint's safetensors, one expert at a time
  (`moekit.runtime.expert_store.DiskExperts`); the default for a folder on a CPU device,
  where RAM is what offloading saves.
- ``memory``: fused tensors in CPU memory (`moekit.runtime.expert_store.MemoryExperts`): a
  model given in memory (and the built-in tiny models, which have no files) is its own
  tier; a folder's experts are read into it once, in their stored dtypes, pinned when the
  device is a GPU so copies to it do not stop the CPU. The default on a GPU, where CPU
  memory is the larger tier. Only this tier can compute a miss where it is
  (`moekit.runtime.miss_compute`).

`open_experts` loads everything but the routed experts onto the device and returns one
source per MoE layer; the options are checked by `choose` before anything is read.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from moekit.errors import MoekitError, setting


def choose(model, device: torch.device, slow_tier: str | None, compute_misses: str | None) -> tuple[str, str]:
    """(slow tier, compute_misses mode) from the options, refused before anything is read."""
    from moekit.io.load import TINY_PREFIX
    from moekit.runtime.miss_compute import MODES

    if slow_tier not in (None, "disk", "memory"):
        raise MoekitError(f"{setting('slow_tier', slow_tier)} is not one of disk, memory.")
    if compute_misses not in (None, *MODES):
        raise MoekitError(f"{setting('compute_misses', compute_misses)} is not one of {', '.join(MODES)}.")
    given_in_memory = isinstance(model, nn.Module) or str(model).startswith(TINY_PREFIX)
    if given_in_memory and slow_tier == "disk":
        raise MoekitError("a model given in memory has no files to read experts from; offload its folder for a "
                          "disk tier.")
    tier = "memory" if given_in_memory else slow_tier or ("disk" if device.type == "cpu" else "memory")
    mode = compute_misses or ("auto" if tier == "memory" and device.type != "cpu" else "never")
    if mode != "never" and tier == "disk":
        raise MoekitError(f"{setting('compute_misses', mode)} computes missed experts from their copy in CPU memory, "
                          f"and this model's experts are read from disk; add {setting('slow_tier', 'memory')} (RAM for "
                          f"every routed expert) or use {setting('compute_misses', 'never')}.")
    return tier, mode


def in_memory(source, *, pin: bool):
    """A `MemoryExperts` of ``source``'s experts (a `DiskExperts` is read once, in its stored
    dtypes; pinned for copies to a GPU that do not stop the CPU)."""
    from moekit.runtime.expert_store import MemoryExperts

    if isinstance(source, MemoryExperts):
        if pin:
            source.tensors = {n: t if t.is_pinned() else t.pin_memory() for n, t in source.tensors.items()}
        return source
    tensors = {name: torch.empty(shape, dtype=source.stored_dtypes()[name], pin_memory=pin)
               for name, shape in source.shapes.items()}
    with source.reading():
        for expert in range(next(iter(source.shapes.values()))[0]):
            source.read_into(expert, {name: t[expert] for name, t in tensors.items()})
    return MemoryExperts(tensors)


def open_experts(model, *, device: torch.device, dtype: torch.dtype):
    """(model with non-expert weights on ``device``, {layer: slow-tier source})."""
    from moekit.arch.discover import moe_layers
    from moekit.io.load import TINY_PREFIX, load
    from moekit.runtime.expert_store import MemoryExperts

    if isinstance(model, (str, os.PathLike)) and str(model).startswith(TINY_PREFIX):
        model = load(str(model), dtype=dtype)
    if isinstance(model, nn.Module):
        if any(hasattr(L.experts.module, "_moekit_offload") for L in moe_layers(model)):
            raise MoekitError("this model is already offloaded (its experts are not in it any more); offload the "
                              "original model or its folder.")
        sources = {}
        for layer in moe_layers(model):
            module = layer.experts.module
            sources[layer.index] = MemoryExperts({n: p.detach().to("cpu") for n, p in
                                                  module.named_parameters(recurse=False)
                                                  if p.shape[0] == layer.num_experts})
        # move only what is not a routed expert
        _to_device_except_experts(model, {id(L.experts.module) for L in moe_layers(model)}, device, dtype)
        return model.eval(), sources
    return _open_folder(str(model), device=device, dtype=dtype)


def _to_device_except_experts(model: nn.Module, skip: set[int], device, dtype) -> None:
    for module in model.modules():
        if id(module) in skip:
            continue
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and t.device.type != "meta" and (t.device != device or t.dtype != dtype):
                    value = t.to(device, dtype if t.is_floating_point() else t.dtype)
                    store[name] = nn.Parameter(value, requires_grad=False) if isinstance(t, nn.Parameter) else value


def _open_folder(name: str, *, device: torch.device, dtype: torch.dtype):
    from moekit.arch.discover import moe_layers
    from moekit.io.layered import _LAYER_KEY
    from moekit.io.load import open_model
    from moekit.runtime.expert_store import DiskExperts

    lent = open_model(name, dtype=dtype, device=device)
    model = lent.model
    meta_keys = dict.fromkeys(model.state_dict(), True)
    sources = {}
    by_layer: dict[int, list[str]] = {}
    for key in lent.checkpoint.names():
        match = _LAYER_KEY.search(key)
        if match:
            by_layer.setdefault(int(match.group(1)), []).append(key)
    paths = {id(m): n for n, m in model.named_modules()}
    for layer in moe_layers(model):
        module = layer.experts.module
        shapes = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False) if p.shape[0] == layer.num_experts}
        sources[layer.index] = DiskExperts(lent.checkpoint, model, paths[id(module)], shapes,
                                           by_layer.get(layer.index, []), meta_keys, native=lent._native)
    expert_keys = {k for s in sources.values() for k in [*s.direct.values(),
                                                         *(n for p in s.per_expert.values() for ks in p.values()
                                                           for n in ks)]}
    for index in range(len(lent)):  # everything but the routed experts, one layer at a time
        keys = [k for k in by_layer.get(index, []) if k not in expert_keys]
        lent._read(keys, what=f"decoder layer {index}", modules=lent.layers[index])
    return model.eval(), sources
