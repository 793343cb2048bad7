"""A rich progress bar for training: tokens/s, loss, aux loss, expert load imbalance.

When the console is not a terminal (``moekit train ... > run.log`` under nohup or a batch
scheduler) a bar cannot redraw, so the same figures are printed as a plain line every
2% of the run instead (`moekit.progress.plain_line_due`).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from moekit.progress import live_progress, plain_line_due


class TrainProgress:
    """Context manager; ``advance(record)`` after each step, ``note(text)`` for eval lines."""

    def __init__(self, *, total: int, start: int, console: Console | None, enabled: bool) -> None:
        self.enabled = enabled
        self._progress = live_progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[figures]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            enabled=enabled,
        )
        # empty until a step of this session has run: no "loss nan" for figures not yet known
        self._task = self._progress.add_task("train", total=total, completed=start, figures="")

    def __enter__(self) -> TrainProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def advance(self, record: dict[str, Any]) -> None:
        task = self._progress.tasks[0]
        before = task.completed
        figures = (f"{record['tokens_per_s']:>6.0f} tok/s  loss {record['loss']:.4f}  aux {record['aux_loss']:.4f}  "
                   f"imbalance {record['imbalance']:.2f}")
        self._progress.update(self._task, advance=1, figures=figures)
        console = self._progress.console
        if self.enabled and not console.is_terminal and plain_line_due(before, task.completed, task.total, lines=50):
            remaining = f"{task.time_remaining / 60:.0f} min left" if task.time_remaining is not None else ""
            console.print(f"train {task.completed:.0f}/{task.total:.0f}  {figures.lstrip()}  {remaining}".rstrip(),
                          highlight=False)

    def note(self, text: str) -> None:
        if self.enabled:
            self._progress.console.print(text, highlight=False)
