"""The hidden states of every calibration or evaluation row, between two decoder layers.

A streamed pass keeps, for each batch of rows, the hidden state [B, S, H] entering the
next layer: N·S·H·4 bytes in fp32 for N rows of S tokens. That is small for a few hundred
rows but not for long evaluations of wide models (10,000 rows of 2,048 tokens at
H = 7,168 is 587 GB), so above a budget the states live in files of a work folder
instead, read one batch at a time: memory then holds one batch, whatever N is.

Explicit reads and writes, not memory maps: mapped pages count as the process's resident
memory, which is exactly what the budget is meant to bound.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


class HiddenStates:
    """Per-batch hidden states of one stream of rows, in memory or in files.

    ``hidden[b]`` reads batch ``b``; ``hidden[b] = tensor`` replaces it (same shape).
    """

    def __init__(self, batches: list[torch.Tensor], *, folder: Path | None = None, name: str = "hidden") -> None:
        self.shapes = [tuple(b.shape) for b in batches]
        self.dtype = batches[0].dtype if batches else torch.float32
        self.folder = folder
        self.name = name
        self._memory: list[torch.Tensor] | None = None
        self.bytes_written = 0
        if folder is None:
            self._memory = [b.detach().cpu() for b in batches]
        else:
            folder.mkdir(parents=True, exist_ok=True)
            for b, tensor in enumerate(batches):
                self[b] = tensor

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes) * torch.empty((), dtype=self.dtype).element_size()

    def _path(self, b: int) -> Path:
        return self.folder / f"{self.name}-{b:05d}.bin"

    def __getitem__(self, b: int) -> torch.Tensor:
        if self._memory is not None:
            return self._memory[b]
        array = np.fromfile(self._path(b), dtype=_NUMPY[self.dtype])
        return torch.from_numpy(array).view(self.shapes[b])

    def __setitem__(self, b: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu", self.dtype)
        if self._memory is not None:
            self._memory[b] = tensor
            return
        partial = self._path(b).with_suffix(".partial")
        tensor.contiguous().numpy().tofile(partial)
        os.replace(partial, self._path(b))
        self.bytes_written += tensor.numel() * tensor.element_size()

    def save(self, folder: Path) -> None:
        """Write every batch into ``folder`` (a checkpoint a resumed run reads back)."""
        folder.mkdir(parents=True, exist_ok=True)
        for b in range(len(self)):
            self[b].contiguous().numpy().tofile(folder / f"{self.name}-{b:05d}.bin")

    def load(self, folder: Path) -> None:
        """Replace every batch by the one `save` wrote into ``folder``."""
        for b in range(len(self)):
            array = np.fromfile(folder / f"{self.name}-{b:05d}.bin", dtype=_NUMPY[self.dtype])
            self[b] = torch.from_numpy(array).view(self.shapes[b])

    def cat(self) -> torch.Tensor:
        return torch.cat([self[b] for b in range(len(self))])


_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


class ActivationBudget:
    """Decides where streams live: in memory while their total stays under ``budget``
    bytes (None: always), else in files under ``folder`` (a temporary folder if None)."""

    def __init__(self, budget: int | None = None, folder: Path | None = None) -> None:
        self.budget = budget
        self.folder = folder
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.held = 0
        self.spilled: list[HiddenStates] = []

    def place(self, batches: list[torch.Tensor], name: str) -> HiddenStates:
        size = sum(b.numel() * b.element_size() for b in batches)
        if self.budget is None or self.held + size <= self.budget:
            self.held += size
            return HiddenStates(batches, name=name)
        if self.folder is None:
            self._tmp = self._tmp or tempfile.TemporaryDirectory(prefix="moekit-activations-")
            self.folder = Path(self._tmp.name)
        states = HiddenStates(batches, folder=self.folder / name, name=name)
        self.spilled.append(states)
        return states

    def copy(self, states: HiddenStates, name: str) -> HiddenStates:
        return self.place([states[b].clone() for b in range(len(states))], name)

    def report(self) -> dict:
        return {"budget_bytes": self.budget, "in_memory_bytes": self.held,
                "spilled_bytes": sum(s.nbytes for s in self.spilled),
                "bytes_written": sum(s.bytes_written for s in self.spilled)}

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
