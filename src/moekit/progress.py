"""One progress bar style for long work: rich, with a rate, on stderr."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextlib.contextmanager
def progress_bar(
    title: str, *, total: int, unit: str = "it", enabled: bool = True
) -> Iterator[Callable[[int, str | None], None]]:
    """Yield ``advance(n, status=None)``; draws nothing when ``enabled`` is False."""
    if not enabled:
        yield lambda n=1, status=None: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[dim]{task.fields[status]}"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(title, total=total, status="", rate="")

        def advance(n: int = 1, status: str | None = None) -> None:
            progress.advance(task, n)
            speed = progress.tasks[task].speed
            rate = f"{speed:.1f} {unit}/s" if speed else ""
            progress.update(task, status=status or "", rate=rate)

        yield advance
