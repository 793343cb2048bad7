"""One progress bar style for long work: rich, with a rate, on stderr.

A bar cannot redraw when its console is not a terminal (output redirected to a file
under nohup or a batch scheduler), so there it is not drawn at all (`live_progress`) and
the same figures are printed as plain lines (`plain_line_due`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def silence_transformers_bars() -> None:
    """Turn off transformers' own tqdm bars (per-tensor loading, "Writing model shards"):
    moekit draws one bar per unit of its own work, and theirs would interleave with it."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def live_progress(*columns: object, console: Console | None, enabled: bool = True) -> Progress:
    """A rich Progress that draws only on a terminal. Elsewhere rich would still print the
    bar once when it stops, among the plain lines; its task still counts and measures rates."""
    console = console or Console(stderr=True)
    return Progress(*columns, console=console, transient=False, disable=not (enabled and console.is_terminal))


def plain_line_due(before: float, done: float, total: float, *, lines: int = 10) -> bool:
    """Whether advancing from ``before`` to ``done`` items of ``total`` crosses one of about
    ``lines`` evenly spaced points (the last item always is one)."""
    every = max(1, int(total) // lines)
    return done // every > before // every or done >= total


def _other_rank() -> bool:
    """A torch.distributed rank other than 0 (torchrun sets RANK): rank 0 alone shows progress."""
    import os

    return os.environ.get("RANK", "0") != "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1


STATUS_EVERY = 5.0  # seconds between plain status lines within one unit of work


@contextlib.contextmanager
def progress_bar(
    title: str, *, total: int, unit: str = "it", enabled: bool = True, console: Console | None = None
) -> Iterator[Callable[[int, str | None], None]]:
    """Yield ``advance(n, status=None)``; draws nothing when ``enabled`` is False.

    ``advance(0, status)`` reports work inside one unit (a layer's search, its refit): the
    bar's status changes, and where no bar is drawn a plain line is printed at most every
    ``STATUS_EVERY`` seconds, so long units are not silent in a log file either."""
    if not enabled or _other_rank():
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
    console = console or Console(stderr=True)
    with live_progress(*columns, console=console) as progress:
        task = progress.add_task(title, total=total, status="", rate="")
        last_line = [time.monotonic()]

        def advance(n: int = 1, status: str | None = None) -> None:
            if n == 0 and status:
                progress.update(task, status=status)
                if not console.is_terminal and time.monotonic() - last_line[0] >= STATUS_EVERY:
                    last_line[0] = time.monotonic()
                    done = progress.tasks[task].completed
                    console.print(f"{title} {done:.0f}/{total} {status}", highlight=False)
                return
            before = progress.tasks[task].completed
            progress.advance(task, n)
            speed = progress.tasks[task].speed
            rate = f"{speed:.1f} {unit}/s" if speed else ""
            progress.update(task, status=status or "", rate=rate)
            done = progress.tasks[task].completed
            if not console.is_terminal and plain_line_due(before, done, total):
                last_line[0] = time.monotonic()
                console.print(f"{title} {done:.0f}/{total} {status or ''} {rate}".replace("  ", " ").rstrip(),
                              highlight=False)

        yield advance


def counting_status(report: Callable[[str], None] | None, what: str, unit: str,
                    bound: int | None = None) -> Callable[[int], None] | None:
    """A callback for work counted inside one unit (candidate sets searched, experts
    refitted): each call adds its ``n`` and reports ``"<what>: done/≤bound unit, rate unit/s"``
    through ``report`` (e.g. ``lambda s: advance(0, s)``). None when ``report`` is None."""
    if report is None:
        return None
    start, done = time.monotonic(), [0]

    def add(n: int = 1) -> None:
        done[0] += n
        elapsed = time.monotonic() - start
        rate = f", {done[0] / elapsed:.0f} {unit}/s" if elapsed > 0.5 else ""
        limit = f"/≤{bound:,}" if bound else ""
        report(f"{what}: {done[0]:,}{limit} {unit}{rate}")

    return add
