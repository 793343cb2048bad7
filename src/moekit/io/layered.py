"""A model whose decoder layers are present one at a time: the unit every command streams.

`LayeredModel` wraps an HF causal LM and lends out its decoder layers in turn:
``layer(i)`` makes layer ``i`` ready on the compute device, ``release(i)`` gives its
memory back. Two kinds, one interface, so every command has a single loop:

- `LayeredModel.in_memory(model)`: a model already in memory (tests, small models, the
  Python API); lending a layer moves it to the device, releasing moves it back.
- `LayeredModel.from_checkpoint(folder)`: the model's skeleton is built on PyTorch's
  ``meta`` device from its config (no memory), the non-layer weights (embeddings, final
  norm, head) are read once, and each decoder layer is read from the safetensors shards
  when lent, in the compute dtype, and dropped back to ``meta`` when released. Memory:
  embeddings + head + one decoder layer, whatever the depth.

Reading goes through transformers' own weight conversion (its per-checkpoint renames and
the fusing of per-expert tensors into ``gate_up_proj``/``down_proj``), applied to one
layer's tensors at a time, so a layer lent here holds exactly what ``from_pretrained``
would have put there.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch
from torch import nn

from moekit.arch.discover import decoder_stack
from moekit.arch.storage import to_meta
from moekit.errors import MoekitError

_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class LayeredModel:
    """An HF causal LM lent out one decoder layer at a time (see the module docstring).

    Attributes:
        model: the whole module tree; with ``from_checkpoint`` the layers not lent are
            parameters on the ``meta`` device (shapes only).
        device: where lent layers and the non-layer weights compute.
        checkpoint: the `Checkpoint` read from (None for a model in memory).
    """

    def __init__(self, model: nn.Module, *, device: torch.device, checkpoint=None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.model = model
        self.device = device
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.family, self.layers_path = decoder_stack(model)
        self.layers = model.get_submodule(self.layers_path)
        self._keys: dict[int | None, list[str]] = {}
        if checkpoint is not None:
            for name in checkpoint.names():
                match = _LAYER_KEY.search(name)
                self._keys.setdefault(int(match.group(1)) if match else None, []).append(name)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def in_memory(cls, model: nn.Module, *, device: torch.device | str | None = None) -> LayeredModel:
        device = torch.device(device) if device is not None else next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        return cls(model, device=device, dtype=dtype)

    @classmethod
    def from_checkpoint(cls, folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", trust_remote_code: bool = False,
                        **from_config) -> LayeredModel:
        """The skeleton of the checkpoint in ``folder`` with its non-layer weights read;
        layers are read when lent. Every tensor of the checkpoint is checked against the
        skeleton's shapes first, so a checkpoint that disagrees with its config fails here,
        naming the file and the tensor, before any work. ``from_config`` goes to
        transformers' ``from_config`` (e.g. ``experts_implementation``)."""
        from moekit.io.skeleton import checked_skeleton

        _allocate_big_blocks_by_mmap()
        model, checkpoint, native = checked_skeleton(Path(folder), dtype=dtype,
                                                     trust_remote_code=trust_remote_code, **from_config)
        lent = cls(model.eval(), device=torch.device(device), checkpoint=checkpoint, dtype=dtype)
        lent._native = native
        lent._read(lent._keys.get(None, []), what="the embeddings, final norm and head")
        model.tie_weights()
        from moekit.methods.dynamic.install import reinstall_saved_policy

        reinstall_saved_policy(model)  # hooks on the skeleton's modules serve every lent layer
        return lent

    # -- lending ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, index: int) -> nn.Module:
        """Decoder layer ``index``, with its weights, on the compute device."""
        module = self.layers[index]
        if self.checkpoint is not None:
            self._read(self._keys.get(index, []), what=f"decoder layer {index}", modules=module)
        else:
            module.to(self.device)
        return module

    def release(self, index: int, *, offload: torch.device | str = "cpu") -> None:
        """Give back decoder layer ``index``'s memory: to ``meta`` when it can be read again
        from the checkpoint, else to ``offload`` (a model in memory keeps its weights)."""
        module = self.layers[index]
        if self.checkpoint is None:
            if self.device != torch.device(offload):
                module.to(offload)
            return
        to_meta(module)
        _return_freed_memory()

    # -- reading ----------------------------------------------------------------------
    def _read(self, names: list[str], *, what: str, modules: nn.Module | None = None) -> None:
        """Read ``names`` into the model, then cast ``modules`` (default: the whole model; its
        unread layers are meta, which costs nothing) to the compute dtype.

        Tensors are converted in the checkpoint's own dtype and cast afterwards, parameter by
        parameter: transformers' conversion holds each expert's tensor and the fused result at
        once, so converting bf16 into fp32 directly would hold about three fp32 copies of a
        layer's experts, where this holds the layer in bf16 plus one fp32 parameter."""
        if not names:
            return
        modules = modules if modules is not None else self.model
        load_dtype = self.checkpoint.floating_dtype() or self.dtype
        self._load_in_stored_dtypes(modules, load_dtype)
        if self._native:
            from moekit.io.skeleton import tied_groups

            state = self.checkpoint.read(names)
            for group in tied_groups(self.model):  # safetensors' save_model keeps one name of each
                present = [name for name in group if name in state]
                if present:
                    state.update({name: state[present[0]] for name in group})
            _assign(self.model, state, self.dtype, self.device)
            self._to_compute_dtype(modules)
            return
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        from moekit.progress import silence_transformers_bars

        silence_transformers_bars()
        config = LoadStateDictConfig(dtype=load_dtype, device_map={"": self.device},
                                     weight_mapping=get_model_conversion_mapping(self.model))
        with self.checkpoint.slices(names) as state, _synchronous_loading():
            info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
        if info.mismatched_keys:
            name, got, expected = sorted(info.mismatched_keys)[0]
            raise MoekitError(f"{self.checkpoint.folder}: {name} has shape {tuple(got)} but the config says "
                              f"{tuple(expected)}; the config.json does not describe these weights.")
        if info.unexpected_keys:
            raise MoekitError(f"{self.checkpoint.folder}: {what} holds tensors the config has no place for "
                              f"({', '.join(sorted(info.unexpected_keys)[:3])}); the config.json does not describe "
                              "these weights.")
        self.model._weight_conversions = None  # save with the family's standard names (see io.shards)
        self._to_compute_dtype(modules)

    def _to_compute_dtype(self, modules: nn.Module) -> None:
        """Cast ``modules`` to the compute dtype as ``from_pretrained(dtype=...)`` loads a
        model: stored tensors to `storage_dtypes` (float32 where the class keeps it, e.g.
        DeepSeek-V3's correction bias), computed buffers (rotary tables, which transformers
        builds in float32 at any dtype) as they were built: ``modules.to(bf16)`` would round the
        rotary frequencies, and a bf16 `moekit.load` would compute other logits than
        transformers'."""
        from moekit.arch.storage import storage_dtypes

        plan = storage_dtypes(self.model, self.dtype)
        prefix = {id(m): name for name, m in self.model.named_modules()}
        for module in modules.modules():
            owner = prefix.get(id(module), "")
            for store in (module._parameters, module._buffers):
                for name, tensor in list(store.items()):
                    if tensor is None or not tensor.is_floating_point() or (
                            store is module._buffers and name in module._non_persistent_buffers_set):
                        continue
                    dtype = plan.get(f"{owner}.{name}" if owner else name, self.dtype)
                    if tensor.dtype != dtype:
                        store[name] = (nn.Parameter(tensor.to(dtype), requires_grad=tensor.requires_grad)
                                       if isinstance(tensor, nn.Parameter) else tensor.to(dtype))

    def _load_in_stored_dtypes(self, modules: nn.Module, default: torch.dtype) -> None:
        """Give the (meta) parameters of ``modules`` the dtype their checkpoint tensor has
        (transformers converts into the target parameter's dtype): a tensor stored under its
        own name keeps its dtype (DeepSeek-V3's fp32 router in a bf16 checkpoint), a fused
        one takes the checkpoint's main dtype."""
        from moekit.io.checkpoint import _DTYPES

        prefix = {id(m): name for name, m in self.model.named_modules()}
        for module in modules.modules():
            owner = prefix.get(id(module), "")
            for store in (module._parameters, module._buffers):
                for name, tensor in store.items():
                    if tensor is None or not tensor.is_floating_point() or tensor.device.type != "meta":
                        continue
                    entry = self.checkpoint.tensors.get(f"{owner}.{name}" if owner else name)
                    dtype = _DTYPES.get(entry.dtype, default) if entry is not None else default
                    if tensor.dtype != dtype:
                        store[name] = (nn.Parameter(tensor.to(dtype), requires_grad=tensor.requires_grad)
                                       if isinstance(tensor, nn.Parameter) else tensor.to(dtype))



def _glibc():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl)
        return None


def _allocate_big_blocks_by_mmap() -> None:
    """Make glibc serve every block of 256 KiB or more by its own mmap, returned to the OS
    when freed. By default glibc raises that threshold after the first large free (up to
    32 MiB), so a layer's tensors then come from the heap and are not given back: measured,
    a streamed pass's resident memory grew by about two thirds of a layer per layer read
    (hidden 512, 16 experts), and stayed flat with this."""
    libc = _glibc()
    if libc is not None:
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 256 << 10)


def _return_freed_memory() -> None:
    """Hand the freed layer's remaining heap pages back to the OS."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def _synchronous_loading():
    """transformers converts on a thread pool that reads every tensor of the group ahead of
    the conversion (all of a layer's experts at once, measured 4.3 GB for a 1.3 GB layer);
    one tensor at a time holds only what is being converted."""
    before = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["HF_DEACTIVATE_ASYNC_LOAD"]
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = before


def _assign(model: nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> None:
    """Put tensors stored under the model's own names into it (moekit's native format)."""
    for name, tensor in state.items():
        owner_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        if attr in owner._parameters:
            old = owner._parameters[attr]
            owner._parameters[attr] = nn.Parameter(value, requires_grad=old is None or old.requires_grad)
        else:
            owner._buffers[attr] = value


def read_whole(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               **from_config) -> nn.Module:
    """A checkpoint the layer-streamed reader understands, read whole: moekit's non-uniform
    format (experts cut per layer, factored experts), or a compressed-tensors checkpoint
    with each Linear decompressed by its own config group's scheme (transformers applies
    one scheme to all fused experts, so a mixed-precision checkpoint loads correctly only
    this way). ``from_config`` goes to transformers' ``from_config``."""
    lent = LayeredModel.from_checkpoint(folder, dtype=dtype, device=device, **from_config)
    for index in range(len(lent)):
        lent.layer(index)
    return lent.model.eval()
