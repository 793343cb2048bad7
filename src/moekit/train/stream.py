"""A resumable stream of training batches, and the learning-rate schedule.

The order of rows is a pure function of (seed, epoch): each epoch is a fresh
permutation drawn from its own generator. The stream's whole state is therefore two
integers, (epoch, cursor), which a checkpoint stores in JSON; resuming rebuilds the same
permutation and continues at the same row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


class BatchStream:
    """Batches of rows [B, L] drawn without replacement from ``rows`` [N, L], epoch by epoch."""

    def __init__(self, rows: torch.Tensor, *, batch_size: int, seed: int) -> None:
        if rows.shape[0] < batch_size:
            raise ValueError(f"{rows.shape[0]} rows cannot fill a batch of {batch_size}")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.rows.shape[0], generator=gen)

    def next(self) -> torch.Tensor:
        """The next batch; an epoch's last incomplete batch is skipped so shapes never change."""
        if self.cursor + self.batch_size > self.rows.shape[0]:
            self.epoch += 1
            self.cursor = 0
            self._order = self._permutation(self.epoch)
        index = self._order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return self.rows[index]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.cursor = state["cursor"]
        self._order = self._permutation(self.epoch)


def learning_rate(
    step: int, *, peak: float, warmup: int, total: int, min_ratio: float,
    extensions: Sequence[tuple[int, int]] = (),
) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine decay to
    ``min_ratio · peak`` at ``total``. ``step`` counts from 0 (the first update).

    ``extensions`` are ``(at, steps)`` pairs, oldest first: the run was resumed at step
    ``at`` with its step count changed to ``steps``. From ``at`` (or from the end of the
    warmup, if later) the rate follows a new cosine from the rate the schedule had reached
    down to ``min_ratio · peak`` at ``steps``, so it never jumps: a run extended before its
    warmup ended gets the schedule of a run started with ``steps``; one extended
    after it finished stays at ``min_ratio · peak``.

    A pure function of the step and the run's settings, so the schedule has no state to
    save or restore.
    """
    if extensions:
        *earlier, (at, steps) = extensions
        begin = max(at, warmup)
        if step < begin:
            return learning_rate(step, peak=peak, warmup=warmup, total=total, min_ratio=min_ratio, extensions=earlier)
        reached = learning_rate(begin, peak=peak, warmup=warmup, total=total, min_ratio=min_ratio,
                                extensions=earlier)
        progress = min(1.0, (step - begin) / max(1, steps - begin))
        floor = peak * min_ratio
        return floor + (reached - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
