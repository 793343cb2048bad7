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
from pathlib import Path

import torch
from torch import nn

from moekit.arch.storage import storage_dtypes

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

    def write_layer(self, index: int, prefix: str) -> Path:
        """Write the tensors of decoder layer ``index`` (names starting with ``prefix``)."""
        return self._write(self.path(index), lambda name: name.startswith(prefix))

    def write_outer(self, layers_prefix: str) -> Path:
        """Write every tensor outside the decoder layers (each tied tensor once)."""
        return self._write(self.path(OUTER), lambda name: not name.startswith(layers_prefix))

    def _write(self, path: Path, wanted) -> Path:
        from safetensors.torch import save_file

        from moekit.arch.storage import saved_tensors

        state = {}
        for name, tensor in saved_tensors(self.model):
            if wanted(name):
                state[name] = tensor.detach().to(self.plan.get(name, tensor.dtype))
        if not self.native:
            from transformers.core_model_loading import revert_weight_conversion

            state = revert_weight_conversion(self.model, state)
        state = {name: t.to("cpu").contiguous().clone() for name, t in state.items()}
        partial = path.with_suffix(".partial")
        save_file(state, str(partial), metadata={"format": "pt"})
        os.replace(partial, path)
        return path

    def finish(self, out: Path, parts: list[int | str]) -> list[Path]:
        """Move the shards of ``parts`` (in that order) into ``out`` with transformers'
        shard names and write the index. Hard links where possible, so that the work
        folder stays whole until the output is complete (a crash in between can resume)."""
        from safetensors import safe_open

        stem, index_name = ("moekit-model", "moekit-model.safetensors.index.json") if self.native else \
            ("model", "model.safetensors.index.json")
        weight_map, total, written = {}, 0, []
        for n, part in enumerate(parts, start=1):
            name = f"{stem}-{n:05d}-of-{len(parts):05d}.safetensors"
            _link_or_copy(self.path(part), out / name)
            with safe_open(str(out / name), framework="pt") as f:
                for key in f.keys():
                    weight_map[key] = name
                    piece = f.get_slice(key)
                    total += _nbytes(piece.get_dtype(), piece.get_shape())
            written.append(out / name)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / index_name).write_text(json.dumps(index, indent=2) + "\n")
        return written


def _nbytes(dtype: str, shape: list[int]) -> int:
    from moekit.io.checkpoint import TensorEntry

    return TensorEntry(file=Path(), dtype=dtype, shape=tuple(shape)).nbytes


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        import shutil

        shutil.copyfile(source, target)
