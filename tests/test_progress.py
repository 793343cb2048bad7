"""Long work without a terminal still reports progress, as plain lines."""

import io
import os
import re
import subprocess
import sys
import textwrap

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
    # layers and the head: 20 units of work; each count crossed once; lines the ticker repeats
    # while a unit lasts end in "(12s)"
    counts = [int(n) for n in re.findall(r"^evaluating (\d+)/20\b(?!.*\(\d.*\)$).*$", text, flags=re.M)]
    assert counts == sorted(set(counts)) and counts[-1] == 20 and len(counts) >= 5, text
    assert not REDRAWN.search(text), text


def test_work_inside_one_unit_is_reported_as_a_status():
    """A long unit (one layer's search or refit) reports its own counts as the bar's status."""
    import moekit.progress as progress

    seen = []
    add = progress.counting_status(seen.append, "layer 3: search", "set", bound=100)
    add(16)
    add(16)
    assert seen == ["layer 3: search: 16/≤100 set", "layer 3: search: 32/≤100 set"]
    assert progress.counting_status(None, "x", "y") is None


# A bar whose one unit takes 1.2 s, then a phase of 1.2 s, then 1.2 s of nothing inside
# the command's heartbeat; STATUS_EVERY is 0.25 s here, so each should get lines of its own.
SLOW = textwrap.dedent("""
    import time
    import moekit.progress as progress
    progress.STATUS_EVERY = 0.25
    with progress.heartbeat("moekit slow"):
        with progress.progress_bar("refitting", total=1, unit="layer") as advance:
            advance(0, "layer 0: refit: 3 experts")
            time.sleep(1.2)
            advance(1)
        with progress.phase("writing the report"):
            time.sleep(1.2)
        time.sleep(1.2)
""")


def test_a_redirected_run_is_never_silent_for_long(tmp_path):
    """Where no bar is drawn (stderr a file), a unit, a phase and the time between them
    each repeat what is being done with the time taken, STATUS_EVERY apart."""
    log = tmp_path / "stderr.log"
    with log.open("w") as stderr:
        done = subprocess.run([sys.executable, "-c", SLOW], stderr=stderr, timeout=60)
    lines = log.read_text().splitlines()
    assert done.returncode == 0, lines
    assert not REDRAWN.search(log.read_text())
    unit = [line for line in lines if re.fullmatch(r"refitting 0/1 layer 0: refit: 3 experts \(\d+s\)", line)]
    assert len(unit) >= 2, lines  # 1.2 s at one line per 0.25 s: a busy machine may delay some, not all
    assert "refitting 1/1" in lines
    start = lines.index("writing the report…")
    assert lines.index("refitting 1/1") < start
    assert any(re.fullmatch(r"writing the report… \d+s", line) for line in lines[start + 1:]), lines
    assert any(re.fullmatch(r"moekit slow… \d+s", line) for line in lines[start + 1:]), lines
