"""One progress bar style for long work: rich, with a rate, on stderr.

A bar cannot redraw when its console is not a terminal (output redirected to a file
under nohup or a batch scheduler), so there it is not drawn at all (`live_progress`) and
the same figures are printed as plain lines (`plain_line_due`). A log file must not
fall silent either while one unit of work takes long: while a bar or a `phase` (work
with nothing to count: scoring, writing a report) is open, `_Ticker` repeats what is
being done, with the time it has taken, whenever no line came for `STATUS_EVERY` seconds.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


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


def other_rank() -> bool:
    """A torch.distributed rank other than 0 (torchrun sets RANK): rank 0 alone shows progress."""
    import os

    return os.environ.get("RANK", "0") != "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1


STATUS_EVERY = 5.0  # at most this many seconds between plain lines while work is under way


class _Ticker:
    """Where no bar is drawn: the time of the last plain line, the open bars and phases
    (innermost last, each a function giving its current line), and a thread that prints
    the innermost one's line whenever none came for `STATUS_EVERY` seconds (a layer's
    refit, a report being written: one unit, no count to advance)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # `quiet` may run in a signal handler, while this thread holds it
        self.last = time.monotonic()
        self.open: list[tuple[Console, Callable[[], str]]] = []
        self.stop = threading.Event()

    def line(self, console: Console, text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)  # one line however long: a log is not a screen
        self.last = time.monotonic()

    @contextlib.contextmanager
    def watching(self, console: Console, current: Callable[[], str]) -> Iterator[None]:
        entry = (console, current)
        with self.lock:
            self.open.append(entry)
            if len(self.open) == 1:
                self.stop = threading.Event()  # each thread its own: one that is ending never sees the next's
                threading.Thread(target=self._run, args=(self.stop,), name="moekit-progress", daemon=True).start()
        try:
            yield
        finally:
            with self.lock:
                if entry in self.open:  # not after `quiet`
                    self.open.remove(entry)
                if not self.open:
                    self.stop.set()  # the thread ends; the next bar starts another

    def quiet(self) -> None:
        with self.lock:
            self.open.clear()
            self.stop.set()

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(0.25):
            with self.lock:
                if self.open and time.monotonic() - self.last >= STATUS_EVERY:
                    console, current = self.open[-1]
                    self.line(console, current())


_ticker = _Ticker()


def quiet() -> None:
    """No more repeated lines from what is open now: the command is ending (an error, Ctrl-C),
    and its last line must stay the last one."""
    _ticker.quiet()

_drawn: list[str] = []  # the bars being drawn on a terminal now: a phase inside one draws nothing more


def _seconds(start: float) -> str:
    elapsed = time.monotonic() - start
    return f"{elapsed:.0f}s" if elapsed < 120 else f"{elapsed / 60:.1f} min"


@contextlib.contextmanager
def progress_bar(
    title: str, *, total: int, unit: str = "it", enabled: bool = True, console: Console | None = None
) -> Iterator[Callable[[int, str | None], None]]:
    """Yield ``advance(n, status=None)``; draws nothing when ``enabled`` is False.

    ``advance(0, status)`` reports work inside one unit (a layer's search, its refit): the
    bar's status changes and, where no bar is drawn, the ticker's next line shows it."""
    if not enabled or other_rank():
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
    start = time.monotonic()
    with live_progress(*columns, console=console) as progress:
        task = progress.add_task(title, total=total, status="", rate="")

        def line() -> str:
            t = progress.tasks[task]
            return " ".join(f"{title} {t.completed:.0f}/{total} {t.fields['status']} {t.fields['rate']}".split())

        def advance(n: int = 1, status: str | None = None) -> None:
            if n == 0 and status:
                progress.update(task, status=status)
                return
            before = progress.tasks[task].completed
            progress.advance(task, n)
            speed = progress.tasks[task].speed
            progress.update(task, status=status or "", rate=f"{speed:.1f} {unit}/s" if speed else "")
            if not console.is_terminal and plain_line_due(before, progress.tasks[task].completed, total):
                _ticker.line(console, line())

        if console.is_terminal:
            _drawn.append(title)
            try:
                yield advance
            finally:
                _drawn.remove(title)
        else:
            with _ticker.watching(console, lambda: f"{line()} ({_seconds(start)})"):
                yield advance


@contextlib.contextmanager
def phase(title: str, *, enabled: bool = True, console: Console | None = None, spinner: bool = True) -> Iterator[None]:
    """Work with nothing to count (scoring masked experts, writing a report, an lm-eval
    run): on a terminal a spinner with the time taken (none with ``spinner=False``: a
    library draws its own bars inside); in a log file a line when it starts, then
    ``title… 12s`` whenever nothing else was printed for `STATUS_EVERY` seconds."""
    if not enabled or other_rank():
        yield
        return
    console = console or Console(stderr=True)
    if console.is_terminal:
        if not spinner or _drawn:  # inside a bar that is drawn already: that one moves
            yield
            return
        with Progress(SpinnerColumn(), TextColumn("{task.description}…"), TimeElapsedColumn(), console=console,
                      transient=True) as progress:
            progress.add_task(title, total=None)
            _drawn.append(title)
            try:
                yield
            finally:
                _drawn.remove(title)
        return
    _ticker.line(console, f"{title}…")
    with heartbeat(title, console=console):
        yield


@contextlib.contextmanager
def heartbeat(title: str, *, console: Console | None = None) -> Iterator[None]:
    """Where no bar is drawn: ``title… 12s`` whenever nothing was printed for
    `STATUS_EVERY` seconds while the block runs and no bar or phase inside it is open. The
    command line holds one around each whole command, for what no phase covers (imports)."""
    console = console or Console(stderr=True)
    if console.is_terminal or other_rank():
        yield
        return
    start = time.monotonic()
    with _ticker.watching(console, lambda: f"{title}… {_seconds(start)}"):
        yield


class PlainLines:
    """A file for a library's tqdm bar where no bar can be drawn: each redraw (the text
    after a carriage return) becomes one plain line, counted as one by the ticker.
    Give the bar ``mininterval=STATUS_EVERY`` so that redraws are that far apart."""

    encoding = "utf-8"

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.shown = ""

    def write(self, text: str) -> int:
        for piece in text.replace("\r", "\n").split("\n"):
            if piece.strip() and piece.strip() != self.shown:
                self.shown = piece.strip()
                _ticker.line(self.console, self.shown)
        return len(text)

    def flush(self) -> None:
        pass


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
