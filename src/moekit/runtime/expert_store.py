"""The slow tier: where one routed expert's weights are read from when the cache misses.

A source answers ``read(e)`` with expert ``e``'s slice of every fused parameter of one
experts module — ``{"gate_up_proj": [2I, H], "down_proj": [H, I], ...}`` (the module's
parameters without their leading E; GPT-OSS's biases included) — reading nothing else;
``read_into(e, out)`` copies the same into given tensors (a cache slot), the runtime's path.

- `MemoryExperts`: the fused tensors of a model already in memory (CPU RAM when the
  compute device is a GPU, or a tiny model in tests): ``read`` is an index.
- `DiskExperts`: the checkpoint's safetensors. Checkpoints store experts either fused
  (moekit's own format, GPT-OSS) — read as one slice ``[e]`` of the stored tensor — or one
  tensor per expert and projection (``experts.3.gate_proj.weight``), which transformers'
  weight conversion stacks and concatenates into the fused parameters when it loads a
  model. Rather than re-deriving each family's names, `DiskExperts` asks transformers'
  own renaming which checkpoint tensors become which fused parameter (as
  `moekit.io.layered` does for a whole layer), and runs that converter on expert ``e``'s
  tensors alone: stacking one expert gives the fused tensor with E = 1, i.e. its slice.

Files are opened once per cache request (`reading`: every miss of one experts call shares
the open file; opening parses the whole safetensors header, measured at ~1 ms per open on
a reference model, most of a miss's time) and closed after, for the reason
`Checkpoint.read` gives (mapped pages left open count as resident memory); a file that
vanished mid-run is reported as such (`MoekitError`), not as a crash deep in safetensors.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterator

import torch

from moekit.errors import MoekitError


class MemoryExperts:
    """Experts read from fused tensors in memory. ``tensors``: name -> [E, ...]."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def read(self, expert: int) -> dict[str, torch.Tensor]:
        return {name: t[expert] for name, t in self.tensors.items()}

    def stored_dtypes(self) -> dict[str, torch.dtype]:
        return {name: t.dtype for name, t in self.tensors.items()}

    def read_into(self, expert: int, out: dict[str, torch.Tensor]) -> None:
        for name, t in self.tensors.items():
            # to a GPU from pinned memory: queued on the current stream, the CPU goes on
            out[name].copy_(t[expert], non_blocking=out[name].device.type == "cuda")

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        yield


class DiskExperts:
    """Experts of the experts module at ``path`` read from ``checkpoint`` on demand.

    Args:
        checkpoint: the model's `moekit.io.checkpoint.Checkpoint`.
        model: the skeleton (meta weights are enough) whose conversion mapping applies.
        path: module path of the fused experts module, e.g. ``model.layers.3.mlp.experts``.
        shapes: fused parameter name -> full shape ``[E, ...]``.
        names: the checkpoint tensors of that decoder layer.
        meta_keys: the model's state-dict keys (transformers' renaming consults them).
        native: the checkpoint stores the model's own names (no conversion).

    Raises:
        MoekitError: a fused parameter with no checkpoint tensor, or per-expert tensors
            that are not one per expert.
    """

    def __init__(self, checkpoint, model, path: str, shapes: dict[str, tuple[int, ...]], names: list[str],
                 meta_keys: dict[str, bool], native: bool = False) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            dot_natural_key,
            rename_source_key,
        )

        self.checkpoint = checkpoint
        self._handles: dict | None = None  # file -> open safe_open, inside `reading`
        self.path = path
        self.shapes = shapes
        mapping = [] if native else (get_model_conversion_mapping(model) or [])
        renamings = [m for m in mapping if not isinstance(m, WeightConverter)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        targets = {f"{path}.{name}": name for name in shapes}
        self.direct: dict[str, str] = {}  # fused param -> stored fused tensor
        self.per_expert: dict[str, dict[str, list[str]]] = {}  # fused param -> pattern -> names by expert
        self.converter: dict[str, object] = {}
        for key in sorted(names, key=dot_natural_key):
            if key in targets:
                self.direct[targets[key]] = key
                continue
            renamed, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_keys)
            if renamed not in targets:
                continue
            param = targets[renamed]
            if pattern is None:
                self.direct[param] = key
            else:
                self.per_expert.setdefault(param, {}).setdefault(pattern, []).append(key)
                if param not in self.converter:  # one private copy, reused: a convert empties what it collected
                    self.converter[param] = copy.deepcopy(by_pattern[pattern])
        self.layout = {name: _stack_then_concat(c, self.per_expert[name]) for name, c in self.converter.items()}
        for name, shape in shapes.items():
            if name not in self.direct and name not in self.per_expert:
                raise MoekitError(f"{checkpoint.folder}: no tensor of the checkpoint becomes {path}.{name}; "
                                  "cannot offload its experts.")
            for pattern, keys in self.per_expert.get(name, {}).items():
                if len(keys) != shape[0]:
                    raise MoekitError(f"{checkpoint.folder}: {len(keys)} tensors match {pattern!r} for "
                                      f"{path}.{name}, which has {shape[0]} experts.")

    def stored_dtypes(self) -> dict[str, torch.dtype]:
        """The dtype each fused parameter is stored in (a quantized one: its dequantized dtype;
        parts stored in different dtypes: the dtype that holds them all)."""
        from moekit.io.checkpoint import _DTYPES

        out = {}
        for name in self.shapes:
            keys = [self.direct[name]] if name in self.direct else [k for ks in self.per_expert[name].values()
                                                                      for k in ks[:1]]
            dtypes = [_DTYPES.get(self.checkpoint.tensors[k].dtype, torch.float32) for k in keys]
            out[name] = dtypes[0]
            for dtype in dtypes[1:]:
                out[name] = torch.promote_types(out[name], dtype)
        return out

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Reads inside the block share one open handle per file, closed on exit."""
        self._handles = {}
        try:
            with contextlib.ExitStack() as stack:
                self._stack = stack
                yield
        finally:
            self._handles = None

    def _handle(self, file):
        from safetensors import safe_open

        if self._handles is None:
            raise RuntimeError("DiskExperts.read outside reading()")
        if file not in self._handles:
            self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="pt"))
        return self._handles[file]

    def read(self, expert: int) -> dict[str, torch.Tensor]:
        """Expert ``expert``'s slice of each fused parameter, in the stored dtype (inside
        `reading`)."""
        out = {}
        for name, key in self.direct.items():
            out[name] = self._read(key, expert)
        for name, patterns in self.per_expert.items():
            converter = self.converter[name]
            converter.collected_tensors.clear()
            target = f"{self.path}.{name}"
            for pattern, keys in patterns.items():
                converter.add_tensor(target, keys[expert], pattern, lambda k=keys[expert]: self._read(k, None))
            converted = converter.convert(target)
            value = converted[target] if target in converted else next(iter(converted.values()))
            if tuple(value.shape) != (1, *self.shapes[name][1:]):
                raise MoekitError(f"{self.checkpoint.folder}: expert {expert} of {target} converts to shape "
                                  f"{tuple(value.shape)}, not {(1, *self.shapes[name][1:])}.")
            out[name] = value[0]
        return out

    def read_into(self, expert: int, out: dict[str, torch.Tensor]) -> None:
        """Copy expert ``expert``'s slices into ``out[name]`` (inside `reading`), casting to
        their dtype. The usual per-expert layout — stack one tensor per expert, then
        concatenate projections (``gate_proj``, ``up_proj`` → ``gate_up_proj``) — is written
        straight from the file into the slot's parts (measured: the stack, concatenation
        and extra copies were half of a miss); other conversions go through `read`."""
        for name, key in self.direct.items():
            if not self._read_raw(key, expert, out[name]):
                out[name].copy_(self._read(key, expert, fresh=False))
        generic = [name for name in self.per_expert if self.layout[name] is None]
        for name, (dim, order) in ((n, self.layout[n]) for n in self.per_expert if self.layout[n] is not None):
            offset = 0
            for pattern in order:
                key = self.per_expert[name][pattern][expert]
                shape = self.checkpoint.tensors[key].shape
                size = shape[dim] if len(shape) > dim else 1
                target = out[name].narrow(dim, offset, size)
                if not self._read_raw(key, None, target):
                    target.copy_(self._read(key, None, fresh=False))
                offset += size
        if generic:
            read = self.read(expert)
            for name in generic:
                out[name].copy_(read[name])

    def _read(self, key: str, index: int | None, fresh: bool = True) -> torch.Tensor:
        """Stored tensor ``key`` (``index``: only its slice ``[index]``); ``fresh=False``
        may return a view of the open file, valid inside `reading`."""
        with self._errors(key):
            if key in self.checkpoint.packed:  # compressed-tensors: decompressed whole (small packed)
                tensor = self.checkpoint.read([key])[key]
                return tensor if index is None else tensor[index].clone()
            handle = self._handle(self.checkpoint.tensors[key].file)
            tensor = handle.get_tensor(key) if index is None else handle.get_slice(key)[index]
            return tensor.clone() if fresh else tensor

    def _read_raw(self, key: str, index: int | None, out: torch.Tensor) -> bool:
        """Read ``key`` (its slice ``[index]``) from the file straight into ``out`` when it is
        stored as is in ``out``'s dtype and ``out`` is contiguous CPU memory (one system call:
        no mapped pages counted as the process's memory, no intermediate copy; measured about
        1.5x faster per miss than copying from the mapped file); False when it cannot (a GPU
        slot is copied to from the mapped file)."""
        from moekit.io.checkpoint import _DTYPES

        entry = self.checkpoint.tensors[key]
        if entry.offset < 0 or key in self.checkpoint.packed or not out.is_contiguous() \
                or _DTYPES.get(entry.dtype) != out.dtype or out.device.type != "cpu":
            return False
        nbytes = out.numel() * out.element_size()
        start = entry.offset + (index or 0) * nbytes
        if math.prod(entry.shape[1 if index is not None else 0:]) != out.numel():
            return False
        buffer = memoryview(out.view(-1).view(torch.uint8).numpy())
        with self._errors(key):
            fd = self._fd(entry.file)
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [buffer[done:]], start + done)
                if got <= 0:
                    raise OSError(f"the file ends {nbytes - done} bytes early")
                done += got
        return True

    def _fd(self, file) -> int:
        if self._handles is None:
            raise RuntimeError("DiskExperts.read outside reading()")
        if ("fd", file) not in self._handles:
            fd = os.open(file, os.O_RDONLY)
            self._stack.callback(os.close, fd)
            self._handles["fd", file] = fd
        return self._handles["fd", file]

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """A read that fails because the folder changed under us, as a `MoekitError`."""
        file = self.checkpoint.tensors[key].file
        try:
            yield
        except MoekitError:
            raise
        except Exception as exc:  # noqa: BLE001 - OSError, safetensors' own errors: the folder changed under us
            if not file.is_file():
                raise MoekitError(f"{file} is gone: the model folder was moved or deleted while running "
                                  f"(reading {key!r}); restore it and run again.") from None
            raise MoekitError(f"{file}: cannot read {key!r} ({exc}); the file changed while running.") from None


def _stack_then_concat(converter, patterns: dict[str, list[str]]) -> tuple[int, list[str]] | None:
    """(dimension of one expert's tensor along which its parts are joined, the parts' patterns
    in order) when ``converter`` is transformers' plain ``MergeModulelist(dim=0)`` optionally
    followed by ``Concatenate(dim=d ≥ 1)``; None for anything else."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = converter.operations
    if not ops or type(ops[0]) is not MergeModulelist or ops[0].dim != 0:
        return None
    order = [p for p in converter.source_patterns if p in patterns]
    if len(ops) == 1 and len(order) == 1:
        return 0, order
    if len(ops) == 2 and type(ops[1]) is Concatenate and ops[1].dim >= 1:
        return ops[1].dim - 1, order
    return None
