"""Long work without a terminal still reports progress, as plain lines."""

import io
import os
import re
import subprocess
import sys

from rich.console import Console

from moekit.progress import progress_bar
from moekit.train.progress import TrainProgress

# What a bar redrawing itself leaves in a file: escape sequences, carriage returns, bar glyphs.
REDRAWN = re.compile(r"\x1b|\r|━")


def _output(force_terminal: bool, steps: list[int], total: int) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=force_terminal, width=120)
    with progress_bar("calibrating", total=total, unit="batch", console=console) as advance:
        for n in steps:
            advance(n, "layer 0")
    return out.getvalue()


def _lines(force_terminal: bool, steps: list[int], total: int) -> list[int]:
    text = _output(force_terminal, steps, total)
    return [int(m) for m in re.findall(r"^calibrating (\d+)/%d layer 0" % total, text, flags=re.M)]


def test_redirected_output_gets_a_line_every_tenth_of_the_work():
    assert _lines(False, [1] * 20, 20) == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert _lines(False, [3] * 7 + [2], 23) == [3, 6, 9, 12, 15, 18, 21, 23]  # every 2; steps of 3 cross one each
    assert _lines(False, [1] * 3, 3) == [1, 2, 3]


def test_a_terminal_gets_only_the_bar():
    assert _lines(True, [1] * 20, 20) == []


def test_redirected_output_holds_only_the_plain_lines():
    text = _output(False, [1] * 20, 20)
    assert not REDRAWN.search(text)
    assert all(re.fullmatch(r"calibrating \d+/20 layer 0( [\d.]+ batch/s)?", line) for line in text.splitlines())
    assert REDRAWN.search(_output(True, [1] * 20, 20))  # the check above can see a bar


def test_training_progress_redirected_holds_only_plain_lines():
    out = io.StringIO()
    record = {"tokens_per_s": 100.0, "loss": 2.0, "aux_loss": 0.01, "imbalance": 1.5}
    with TrainProgress(total=10, start=0, console=Console(file=out, width=120), enabled=True) as progress:
        for _ in range(10):
            progress.advance(record)
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and all(line.startswith("train ") for line in lines)
    assert not REDRAWN.search(out.getvalue())


def test_a_command_with_stderr_in_a_file_writes_plain_lines(tmp_path):
    """What nohup or a batch scheduler gets: the whole command, its stderr a file."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "moekit", "eval", "--max-tokens", "512", "--batch-size", "1", "--threads", "1"],
            stdout=subprocess.DEVNULL, stderr=stderr, env=env, timeout=300,
        )
    text = log.read_text()
    assert done.returncode == 0, text
    # 512 // stride 128 = 4 windows spread over the split (batches of 1) through 4 streamed
    # layers and the head: 20 units of work
    counts = [int(n) for n in re.findall(r"^evaluating (\d+)/20\b", text, flags=re.M)]
    assert counts == sorted(set(counts)) and counts[-1] == 20 and len(counts) >= 5, text
    assert not REDRAWN.search(text), text


def test_work_inside_one_unit_is_reported_as_a_status(monkeypatch):
    """A long unit (one layer's search or refit) reports its own counts; in a log file a
    plain line at most every STATUS_EVERY seconds."""
    import io

    from rich.console import Console

    import moekit.progress as progress

    seen = []
    add = progress.counting_status(seen.append, "layer 3: search", "set", bound=100)
    add(16)
    add(16)
    assert seen == ["layer 3: search: 16/≤100 set", "layer 3: search: 32/≤100 set"]
    assert progress.counting_status(None, "x", "y") is None
    out = io.StringIO()
    with progress.progress_bar("compressing", total=4, console=Console(file=out)) as advance:
        advance(0, "layer 0: refit: 1 expert")  # within STATUS_EVERY of the start: no line
        monkeypatch.setattr(progress, "STATUS_EVERY", 0.0)
        advance(0, "layer 0: refit: 2 expert")
    assert out.getvalue().splitlines() == ["compressing 0/4 layer 0: refit: 2 expert"]
