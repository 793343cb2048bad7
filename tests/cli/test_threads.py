"""`--threads N` on every command that computes: one definition (cli._common.Threads),
applied while the command runs and put back after, refused below 1 in one line; without
it, one thread per core whose waiting threads sleep (cli._threads), said on the first line."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli import app
from tests.cli.test_startup import moekit_command
from tests.training_inputs import write_corpus, write_spec

runner = CliRunner()
COMPUTING = ("analyze", "calibrate", "combine", "compress", "eval", "run", "split", "train", "upcycle")


@pytest.mark.parametrize("command", COMPUTING)
def test_every_computing_command_takes_threads_and_refuses_zero(command, tmp_path):
    assert "--threads" in runner.invoke(app, [command, "--help"]).output
    writes = [] if command in ("eval", "run") else ["-o", str(tmp_path / "out")]
    result = runner.invoke(app, [command, "--threads", "0", *writes])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --threads must be at least 1 (got 0)."
    assert not (tmp_path / "out").exists()


def test_threads_apply_during_the_command_only(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", files=10)
    spec = write_spec(tmp_path / "spec.json", num_layers=1)
    before = torch.get_num_threads()
    wanted = before + 1
    result = runner.invoke(app, ["train", "--arch", str(spec), "--data", str(corpus), "--vocab-size", "300",
                                 "--seq-len", "32", "--batch-size", "4", "--steps", "1", "--threads", str(wanted),
                                 "-o", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "train_log.json").read_text())["meta"]["threads"] == wanted
    assert torch.get_num_threads() == before


# What every case runs: a few windows of the reference model and one timed generation,
# whose report says how many threads torch computed with (torch.get_num_threads()).
SPEED = ["eval", "--max-tokens", "64", "--context-length", "32", "--stride", "16",
         "--speed", "--speed-prefill", "4", "--speed-decode", "2", "--speed-runs", "1"]
# Settings of the user's environment that would change the choice.
OPENMP = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in OPENMP}
    done = subprocess.run([*moekit_command(), *SPEED, *args], env={**clean, **env}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done


def test_the_default_is_one_thread_per_core_reported_first_and_applied():
    """A fresh `moekit` process: its first line names the threads and the load, torch computes
    with that many (one per usable core), and OpenMP's waiting threads sleep."""
    cores = len(os.sched_getaffinity(0))
    done = _run()
    first = done.stderr.splitlines()[0]
    assert re.fullmatch(rf"threads: {cores} \(one per core; load \d+\.\d on {cores} cores; --threads N to "
                        r"override\)", first), done.stderr
    assert f"speed: median of 1 runs, {cores} threads" in done.stdout


def test_the_wait_policy_is_set_only_before_torch_and_never_over_the_users(monkeypatch):
    from moekit.cli._threads import set_wait_policy

    for name in OPENMP:
        monkeypatch.delenv(name, raising=False)
    set_wait_policy()  # this process imported torch (and OpenMP read its environment) already
    assert "OMP_WAIT_POLICY" not in os.environ
    probe = ("import os; from moekit.cli._threads import set_wait_policy; set_wait_policy(); "
             "import sys; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    for env, printed in (({}, "PASSIVE False"), ({"GOMP_SPINCOUNT": "1000"}, "None False")):
        done = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=60, check=True)
        assert done.stdout.strip() == printed, done.stderr


def test_threads_and_omp_num_threads_override_and_json_carries_the_choice():
    """--threads N wins over OMP_NUM_THREADS; with --json the choice is in the JSON, and
    stderr has no line about it. A wait policy the user set is kept."""
    done = _run("--threads", "3", "--json", OMP_NUM_THREADS="2", OMP_WAIT_POLICY="ACTIVE")
    payload = json.loads(done.stdout)
    assert payload["threads"]["count"] == 3 and payload["threads"]["source"] == "--threads"
    assert payload["threads"]["wait_policy"] == "ACTIVE"
    assert payload["models"]["moekit/ref-fine"]["speed"]["threads"] == 3
    assert "threads:" not in done.stderr
    done = _run("--json", OMP_NUM_THREADS="3")
    payload = json.loads(done.stdout)
    assert payload["threads"] == {"count": 3, "source": "OMP_NUM_THREADS", "cores": len(os.sched_getaffinity(0)),
                                  "load": payload["threads"]["load"], "wait_policy": "PASSIVE"}
    assert payload["models"]["moekit/ref-fine"]["speed"]["threads"] == 3
