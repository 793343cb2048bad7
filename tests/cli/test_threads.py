"""`--threads N` on every command that computes: one definition (cli._common.Threads),
applied while the command runs and put back after, refused below 1 in one line."""

import json

import pytest
import torch
from typer.testing import CliRunner

from moekit.cli import app
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
