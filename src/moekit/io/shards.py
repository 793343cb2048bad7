"""Writing a checkpoint one decoder layer at a time, so the output is never whole in memory.

Each finished decoder layer becomes its own safetensors shard; the non-layer weights
(embeddings, final norm, head) another. `finish` names them as transformers does
(``model-00001-of-00006.safetensors``…) and writes ``model.safetensors.index.json``: a
standard sharded checkpoint that ``from_pretrained``, vLLM and SGLang load.

Tensors are cast to their storage dtypes (`moekit.arch.storage.storage_dtypes`, with
transformers' fp32 exceptions) and renamed back to the checkpoint layout with
transformers' own reverse weight conversion (fused ``gate_up_proj`` → per-expert
``gate_proj``/``up_proj``), exactly what ``save_pretrained`` writes. moekit's non-uniform
format keeps the in-memory names (``native``), with ``moekit-model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch
from torch import nn

from moekit.arch.storage import storage_dtypes
from moekit.io.checkpoint import _read_header

OUTER = "outer"


class ShardWriter:
    """Shards of one output checkpoint, written into ``folder`` as layers finish.

    Args:
        folder: where the shards go (a work folder; `finish` moves them to the output).
        model: the model (its skeleton is enough for the names and the config).
        dtype: the output's storage dtype.
        native: write moekit's non-uniform format (in-memory names) instead of the
            family's standard layout.
    """

    def __init__(self, folder: Path, model: nn.Module, *, dtype: torch.dtype, native: bool = False) -> None:
        self.folder = folder
        self.model = model
        self.dtype = dtype
        self.native = native
        self.plan = storage_dtypes(model, dtype)
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, part: int | str) -> Path:
        return self.folder / (f"layer-{part:05d}.safetensors" if isinstance(part, int) else f"{part}.safetensors")

    def write_layer(self, index: int, prefix: str, *, as_index: int | None = None) -> Path:
        """Write the tensors of decoder layer ``index`` (names starting with ``prefix``);
        ``as_index``: under that layer number instead (decoder layers before it were
        dropped, `moekit.arch.edit.drop_blocks`)."""
        rename = None
        if as_index is not None and as_index != index:
            pattern = re.compile(rf"(^|\.)layers\.{index}\.")
            rename = lambda name: pattern.sub(rf"\g<1>layers.{as_index}.", name, count=1)  # noqa: E731
        return self._write(self.path(index), lambda name: name.startswith(prefix), rename=rename)

    def write_outer(self, layers_prefix: str) -> Path:
        """Write every tensor outside the decoder layers (each tied tensor once)."""
        return self._write(self.path(OUTER), lambda name: not name.startswith(layers_prefix))

    def _write(self, path: Path, wanted, rename=None) -> Path:
        """Cast to the storage dtypes (one copy of the layer in the output dtype, none for an
        fp32 output), rename to the checkpoint layout (views) and write tensor by tensor
        (safetensors' ``save_file`` would hold all their bytes as one more copy)."""
        from moekit.arch.storage import saved_tensors
        from moekit.io import compressed

        self.plan = storage_dtypes(self.model, self.dtype)  # a step may have added tensors (factored experts)
        state = {name: tensor.detach().to(self.plan.get(name, tensor.dtype))
                 for name, tensor in saved_tensors(self.model) if wanted(name)}
        if not self.native:
            from transformers.core_model_loading import revert_weight_conversion

            state = revert_weight_conversion(self.model, state)
        book = compressed.ledger(self.model)
        quantized = [name for name in book.params if wanted(name)]
        schemes, fused = {}, {}
        if quantized:
            state, schemes, fused = compressed.pack_state(self.model, state, quantized, book.scale_dtype)
        if rename is not None:
            state = {rename(name): tensor for name, tensor in state.items()}
            schemes = {rename(name): scheme for name, scheme in schemes.items()}
            fused = {rename(name): [rename(m) for m in modules] for name, modules in fused.items()}
        compressed.write_sidecar(path, schemes, fused)
        write_safetensors(path, state)
        return path

    def finish(self, out: Path, parts: list[int | str], *, max_shard_size: int = 5 * 10**9,
               on_file=None) -> list[Path]:
        """Put the shards of ``parts`` (in that order) into ``out`` with transformers' names,
        and write the index and the config (as ``save_pretrained`` does: the stored dtype,
        the architecture, the generation config).

        A model of at most ``max_shard_size`` bytes becomes one ``model.safetensors``, as
        transformers writes it, joined by copying bytes, never holding tensors. A bigger one
        keeps one shard per decoder layer (plus one for the rest), hard-linked from the work
        folder: nothing is copied, and the work folder stays whole until the output is
        complete (a crash in between can resume)."""
        from moekit.io.compressed import mixed_experts, read_schemes

        paths = [self.path(part) for part in parts]
        schemes, fused = read_schemes(paths)
        self._write_config(out, schemes, fused)
        total_size = sum(path.stat().st_size for path in paths)
        # A small model becomes one file, as save_pretrained writes it; a big one keeps a shard
        # per layer, linked, so its bytes are neither read back nor written twice.
        groups = [paths] if total_size <= max_shard_size else [[path] for path in paths]
        # moekit's names where transformers would load wrongly: from_pretrained finds no weights
        moekit_only = self.native or mixed_experts(schemes, fused)
        stem, index_name = ("moekit-model", "moekit-model.safetensors.index.json") if moekit_only else \
            ("model", "model.safetensors.index.json")
        weight_map, total, written = {}, 0, []
        for n, group in enumerate(groups, start=1):
            name = f"{stem}.safetensors" if len(groups) == 1 else f"{stem}-{n:05d}-of-{len(groups):05d}.safetensors"
            target = out / name
            if len(group) == 1:
                _link_or_copy(group[0], target)
            else:
                join_safetensors(group, target)
            for key, entry in _read_header(target).items():
                weight_map[key] = name
                total += entry.nbytes
            written.append(target)
            if on_file is not None:
                on_file(n)
        if len(groups) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (out / index_name).write_text(json.dumps(index, indent=2) + "\n")
        return written

    def _write_config(self, out: Path, schemes: dict[str, str], fused: dict[str, list[str]]) -> None:
        from moekit.io.compressed import quantization_config

        model = self.model
        model.config.dtype = str(self.dtype).removeprefix("torch.")
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(out)
        if schemes:  # config.json gains the compressed-tensors description of what is packed
            config = json.loads((out / "config.json").read_text())
            config["quantization_config"] = quantization_config(schemes, fused)
            (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if model.can_generate() and getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out)
        if self.native:
            from moekit.io.nonuniform import FORMAT, MARKER

            (out / MARKER).write_text(json.dumps({"format": FORMAT, "version": 1}, indent=2))


_SAFETENSORS_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` as one safetensors file without copying them all: the header is
    known from shapes and dtypes alone, then each tensor's bytes follow (a non-contiguous
    view is made contiguous one tensor at a time)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        dtype = tensors[name].dtype
        size = tensors[name].numel() * tensors[name].element_size()
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for name in sorted(tensors):
            tensor = tensors[name].to("cpu").contiguous()
            out.write(tensor.reshape(-1).view(torch.uint8).numpy().data if tensor.numel() else b"")
            del tensor
    os.replace(partial, path)


def join_safetensors(sources: list[Path], target: Path, *, chunk: int = 16 * 2**20) -> None:
    """Write one safetensors file holding every tensor of ``sources``, copying their data
    bytes in chunks: a safetensors file is a JSON header of offsets followed by the raw
    data, so joining needs only new offsets, never the tensors in memory."""
    header: dict = {"__metadata__": {"format": "pt"}}
    layout = []  # (source, data start, data length)
    offset = 0
    for source in sources:
        with open(source, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            own = json.loads(f.read(length))
        own.pop("__metadata__", None)
        end = max((info["data_offsets"][1] for info in own.values()), default=0)
        for name, info in own.items():
            begin, stop = info["data_offsets"]
            header[name] = {**info, "data_offsets": [begin + offset, stop + offset]}
        layout.append((source, 8 + length, end))
        offset += end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for source, start, length in layout:
            with open(source, "rb") as f:
                f.seek(start)
                remaining = length
                while remaining:
                    block = f.read(min(chunk, remaining))
                    out.write(block)
                    remaining -= len(block)
    os.replace(partial, target)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        import shutil

        shutil.copyfile(source, target)
