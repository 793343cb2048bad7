"""`moekit calibrate` and `moekit eval` end to end on a tiny model with its own tokenizer."""

from __future__ import annotations

import json
import textwrap

import pytest
from typer.testing import CliRunner
from transformers import AutoModelForCausalLM

from moekit.calib.stats import CalibrationStats
from moekit.cli import app
from moekit.data.tokenizer import save_tokenizer, train_tokenizer
from moekit.zoo.tiny import randomize_, tiny_config

runner = CliRunner()
TEXT = textwrap.dedent('''
    def fibonacci(n):
        """Return the n-th Fibonacci number."""
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a
''') * 40


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "data").mkdir()
    (root / "data" / "code.py").write_text(TEXT)
    tokenizer = train_tokenizer([TEXT], vocab_size=300, min_frequency=1)
    config = tiny_config("qwen3_moe")
    config.vocab_size = len(tokenizer)
    model = randomize_(AutoModelForCausalLM.from_config(config)).eval()
    model.save_pretrained(root / "model")
    save_tokenizer(tokenizer, root / "model")
    return root


def test_calibrate_writes_reusable_statistics(workspace):
    out = workspace / "stats"
    result = runner.invoke(app, ["calibrate", str(workspace / "model"), "-o", str(out), "--data",
                                 str(workspace / "data"), "--samples", "4", "--seq-len", "32", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["layers"] == 2 and payload["tokens"] == 4 * 32
    stats = CalibrationStats.load(out)
    assert set(stats.statistics) >= {"frequency", "reap", "logit_similarity"}
    assert stats.meta["data_source"] == str(workspace / "data")
    # the same run again refuses to overwrite
    again = runner.invoke(app, ["calibrate", str(workspace / "model"), "-o", str(out), "--data",
                                str(workspace / "data"), "--samples", "4", "--seq-len", "32"])
    assert again.exit_code == 2 and "already exists" in again.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--samples", "100000"], "fewer than the 100000"),
        (["--seq-len", "100000"], "--seq-len 100000 is beyond the 256 positions of"),
        (["--statistics", "vibes"], "unknown statistics"),
    ],
)
def test_calibrate_bad_input(workspace, args, message, tmp_path):
    result = runner.invoke(app, ["calibrate", str(workspace / "model"), "-o", str(tmp_path / "s"),
                                 "--data", str(workspace / "data"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "s").exists()


def test_calibrate_empty_data(workspace, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = runner.invoke(app, ["calibrate", str(workspace / "model"), "-o", str(tmp_path / "s"),
                                 "--data", str(tmp_path / "empty.txt")])
    assert result.exit_code == 2 and "no text" in result.output


def test_eval_compares_models_side_by_side(workspace):
    result = runner.invoke(app, ["eval", str(workspace / "model"), str(workspace / "model"), "--data",
                                 str(workspace / "data"), "--context-length", "64", "--stride", "32",
                                 "--max-tokens", "400", "--json"])
    assert result.exit_code == 0, result.output
    models = json.loads(result.stdout)["models"]
    (only,) = models.values()  # the same model twice collapses to one key
    assert only["tokens"] == 384 and only["perplexity"] > 1  # 12 windows of --stride 32: at most --max-tokens 400
    table = runner.invoke(app, ["eval", str(workspace / "model"), "--data", str(workspace / "data"),
                                "--context-length", "64", "--stride", "32", "--max-tokens", "200"])
    assert table.exit_code == 0, table.output
    assert "perplexity" in table.stdout and "load max/mean" in table.stdout


def _second_model(workspace, name, *, tokenizer_text=None, **config_changes):
    """A copy of the workspace model with other config values or its own tokenizer."""
    folder = workspace / name
    if not folder.exists():
        model = AutoModelForCausalLM.from_pretrained(workspace / "model")
        for key, value in config_changes.items():
            if key == "vocab_size":  # the weights too: a config alone that disagrees with them is refused first
                model.resize_token_embeddings(value)
            setattr(model.config, key, value)
        model.save_pretrained(folder)
        text = tokenizer_text or TEXT
        save_tokenizer(train_tokenizer([text], vocab_size=300, min_frequency=1), folder)
    return folder


@pytest.mark.parametrize(
    "second, message",
    [
        (dict(name="other-tokenizer", tokenizer_text="SELECT name FROM users WHERE id = 1;\n" * 80),
         "uses a different tokenizer from"),
        (dict(name="short-positions", max_position_embeddings=32), "--context-length 64 is beyond the 32 positions of"),
        (dict(name="small-vocab", vocab_size=40), "is outside the model's vocabulary of 40"),
    ],
)
def test_eval_refuses_a_model_that_cannot_be_compared_before_scoring_any(workspace, second, message):
    folder = _second_model(workspace, **second)
    result = runner.invoke(app, ["eval", str(workspace / "model"), str(folder), "--data", str(workspace / "data"),
                                 "--context-length", "64", "--stride", "32", "--max-tokens", "400", "--json"])
    flat = "".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert str(folder) in flat and "".join(message.split()) in flat  # names the model and the problem
