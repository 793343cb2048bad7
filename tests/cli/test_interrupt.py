"""Ctrl-C at any moment (imports, data preparation, work) ends a command with exit code
130 and one short line, never a traceback; an interrupted `train` checkpoints and exits
130 too, so that scripts can tell it from a finished run."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from tests.cli.test_startup import moekit_command
from tests.training_inputs import write_corpus, write_spec

INTERRUPTED = 130


def _ctrl_c_as_in_a_terminal() -> None:
    # a suite started in the background (`pytest &` without job control) ignores SIGINT,
    # and children inherit that; moekit keeps an inherited ignore on purpose
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args: object, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([*moekit_command(), *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_ctrl_c_as_in_a_terminal)


def interrupt_when_a_line_starts(process: subprocess.Popen, prefix: str) -> tuple[str, str]:
    """Send SIGINT as soon as stderr shows a line starting with ``prefix`` (a progress line:
    the work is under way); return stdout and all of stderr."""
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith(prefix):
            process.send_signal(signal.SIGINT)
            break
    out, rest = process.communicate(timeout=120)
    return out, "".join(seen) + rest


def test_during_start_up(tmp_path):
    """While torch is being imported (its library mapped, its modules still loading)."""
    process = start("inspect", cwd=tmp_path)
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 60
    while maps.exists() and "libtorch" not in maps.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not maps.exists():  # no /proc: a delay that falls in the imports on any machine seen so far
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == INTERRUPTED, err
    assert err.splitlines() == ["interrupted"] and out == ""


def test_during_calibration(tmp_path):
    process = start("calibrate", "--samples", 32, "--threads", 1, "-o", "stats", cwd=tmp_path)
    _, err = interrupt_when_a_line_starts(process, "calibrating ")
    assert process.returncode == INTERRUPTED, err
    assert err.splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert not (tmp_path / "stats").exists()  # nothing half-written


def test_interrupted_training_checkpoints_and_exits_130(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    spec = write_spec(tmp_path / "spec.json")
    process = start("train", "--arch", spec, "--data", corpus, "--vocab-size", 300, "--seq-len", 32,
                    "--batch-size", 4, "--steps", 5000, "--checkpoint-every", 5000, "--eval-every", 5000,
                    "--threads", 1, "-o", "run", cwd=tmp_path)
    out, err = interrupt_when_a_line_starts(process, "train ")
    assert process.returncode == INTERRUPTED, err
    assert "interrupted at step" in out and "Traceback" not in err
    assert any((tmp_path / "run" / "checkpoints").iterdir())  # it stopped at a step boundary and saved
