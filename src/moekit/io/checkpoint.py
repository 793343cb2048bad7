"""What a safetensors checkpoint holds, read from its index and headers alone.

A `Checkpoint` maps every tensor name to the shard that stores it, with its dtype and
shape, without reading a single weight: the headers of safetensors files are small JSON
blocks at the front. It is the first thing a streamed command opens, so a broken
checkpoint (an index naming a missing shard, a truncated shard, a tensor whose shape
disagrees with the config) is reported in one line naming the file and the tensor before
any work starts or any output is written.

Weights are then read a group at a time (`read`: one decoder layer's tensors), so reading
a layer touches only that layer's bytes on disk.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.errors import MoekitError

INDEX_NAMES = ("model.safetensors.index.json", "moekit-model.safetensors.index.json")

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives and what it is."""

    file: Path
    dtype: str  # safetensors' name: "BF16", "F32", ...
    shape: tuple[int, ...]
    offset: int = -1  # where its bytes start in ``file`` (-1: not stored as such, e.g. decompressed)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _element_size(self.dtype)


class Checkpoint:
    """The tensors of a checkpoint folder, by name (its index if it has one, else every
    ``*.safetensors`` in it).

    Raises:
        MoekitError: an index that is not JSON or names a missing shard, a shard whose
            header is unreadable or whose data is shorter than its header says, or two
            shards holding the same tensor.
    """

    def __init__(self, folder: str | os.PathLike, *, files: Iterable[str] | None = None) -> None:
        self.folder = Path(folder)
        self.tensors: dict[str, TensorEntry] = {}
        for file in self._shards(files):
            for name, entry in _read_header(file).items():
                if name in self.tensors:
                    raise MoekitError(f"{file}: tensor {name!r} is also stored in {self.tensors[name].file.name}; "
                                      "a checkpoint holds each tensor once. Re-save it.")
                self.tensors[name] = entry
        self._unpack_entries()

    def _unpack_entries(self) -> None:
        """A compressed-tensors checkpoint lists, for each packed Linear, the dense weight
        it decompresses to (``X.weight``, in its scales' dtype) instead of its parts, so
        every reader sees ordinary weights; `read` decompresses them."""
        from moekit.io.compressed import packed_modules, unpacked_shape

        self.packed = {f"{module}.weight": found for module, found in packed_modules(self.folder, self.tensors).items()}
        self._parts: dict[str, TensorEntry] = {}
        shapes = {name: entry.shape for name, entry in self.tensors.items()}
        for name, found in self.packed.items():
            for part in found.parts.values():
                self._parts[part] = self.tensors.pop(part)
            scale = self._parts[found.parts["weight_scale"]]
            shape = unpacked_shape(found, shapes, lambda n: self._read_stored([n])[n])
            self.tensors[name] = TensorEntry(file=scale.file, dtype=scale.dtype, shape=shape)

    def _shards(self, files: Iterable[str] | None) -> list[Path]:
        if files is not None:
            return [self.folder / f for f in files]
        for index_name in INDEX_NAMES:
            index = self.folder / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise MoekitError(f"{index}: not a safetensors index (no readable 'weight_map': {exc}).") from None
                shards = sorted(set(weight_map.values()))
                missing = [s for s in shards if not (self.folder / s).is_file()]
                if missing:
                    first = next(k for k, v in weight_map.items() if v == missing[0])
                    raise MoekitError(f"{index} names shard {missing[0]} (holding {first!r}"
                                      f"{' and others' if len(missing) > 1 or len(weight_map) > 1 else ''}), "
                                      "which is not in the folder; copy the missing shard(s) in.")
                return [self.folder / s for s in shards]
        return sorted(self.folder.glob("*.safetensors"))

    # -- reading ----------------------------------------------------------------------
    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (fresh tensors, not views of the files); packed weights
        decompressed.

        Each shard is opened for this call only: safetensors maps a file into memory, and
        mapped pages that were read count as the process's resident memory for as long as
        the map is open — kept open, every layer read would stay "resident" until the end."""
        from moekit.io.compressed import decompress

        names = list(names)
        out = self._read_stored([n for n in names if n not in self.packed])
        for name in (n for n in names if n in self.packed):
            out[name] = decompress(self.packed[name], self._read_stored(self.packed[name].parts.values()))
        return out

    def _read_stored(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault((self.tensors.get(name) or self._parts[name]).file, []).append(name)
        out = {}
        for file, wanted in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for name in wanted:
                    out[name] = handle.get_tensor(name).clone()
        return out

    @contextlib.contextmanager
    def slices(self, names: Iterable[str]) -> Iterator[dict[str, object]]:
        """Lazy handles (safetensors slices) of ``names``, valid inside the block: a reader
        that converts tensor by tensor (transformers' loading) then holds only what it has
        converted, not a second copy of the whole group. The files are closed on exit, for
        the reason `read` gives."""
        from safetensors import safe_open

        names = list(names)
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.packed:
                by_file.setdefault(self.tensors[name].file, []).append(name)
        with contextlib.ExitStack() as stack:
            out = {}
            packed = [n for n in names if n in self.packed]
            if packed:  # small next to what they decompress to: read whole
                out.update(self.read(packed))
            for file, wanted in by_file.items():
                handle = stack.enter_context(safe_open(str(file), framework="pt"))
                out.update({name: handle.get_slice(name) for name in wanted})
            yield out

    # -- describing -------------------------------------------------------------------
    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.tensors if n.startswith(prefix)]

    @functools.cache  # noqa: B019 - one Checkpoint per folder, asked once per layer read
    def floating_dtype(self) -> torch.dtype | None:
        """The floating-point dtype holding most of the weights (None: no float tensor)."""
        counts: dict[torch.dtype, int] = {}
        for entry in self.tensors.values():
            dtype = _DTYPES.get(entry.dtype)
            if dtype is not None and dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + math.prod(entry.shape)
        return max(counts, key=counts.__getitem__) if counts else None

    @property
    def nbytes(self) -> int:
        """Bytes of the weights as read (packed weights decompressed)."""
        return sum(e.nbytes for e in self.tensors.values())

    @property
    def stored_bytes(self) -> int:
        """Bytes of the tensors as stored (packed weights packed)."""
        return sum(self.stored_bytes_by_dtype.values())

    @property
    def stored_bytes_by_dtype(self) -> dict[str, int]:
        """`stored_bytes` by torch dtype name (``bfloat16``, ``int32``, ...)."""
        out: dict[str, int] = {}
        entries = [e for name, e in self.tensors.items() if name not in self.packed] + list(self._parts.values())
        for e in entries:
            dtype = str(_DTYPES[e.dtype]).removeprefix("torch.") if e.dtype in _DTYPES else e.dtype
            out[dtype] = out.get(dtype, 0) + e.nbytes
        return out

    def fingerprint(self) -> str:
        """A digest of names, dtypes, shapes, file sizes and modification times: it changes
        when the checkpoint is replaced, without reading any weight."""
        import hashlib

        digest = hashlib.sha256()
        for name in sorted(self.tensors):
            e = self.tensors[name]
            digest.update(f"{name}|{e.dtype}|{e.shape}|{e.file.name}".encode())
        for file in sorted({e.file for e in self.tensors.values()}):
            stat = file.stat()
            digest.update(f"{file.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:16]


def _element_size(dtype: str) -> int:
    torch_dtype = _DTYPES.get(dtype)
    if torch_dtype is None:
        return 1
    return torch.empty((), dtype=torch_dtype).element_size()


def _read_header(file: Path) -> dict[str, TensorEntry]:
    """The tensors a shard declares, checked against the file's size (a truncated copy is
    caught here, not as a crash in the middle of a layer)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", raw)
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise MoekitError(f"{file}: not a readable safetensors file ({exc}); the download or copy is broken, "
                          "fetch it again.") from None
    entries, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, stop = info["data_offsets"]
        end = max(end, stop)
        entries[name] = TensorEntry(file=file, dtype=info["dtype"], shape=tuple(info["shape"]), offset=8 + length + begin)
    if 8 + length + end > size:
        last = max(header.items(), key=lambda kv: kv[1]["data_offsets"][1] if kv[0] != "__metadata__" else -1)[0]
        raise MoekitError(f"{file} is truncated: its header says {8 + length + end:,} bytes but the file has "
                          f"{size:,} (tensor {last!r} is cut off); fetch the shard again.")
    return entries
