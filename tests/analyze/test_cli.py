"""`moekit analyze` end to end: --json, comparison, and the refusals before any work."""

from __future__ import annotations

import json
import textwrap

import pytest
from transformers import AutoModelForCausalLM, Qwen3Config
from typer.testing import CliRunner

from moekit.cli import app
from moekit.data.tokenizer import save_tokenizer, train_tokenizer
from moekit.zoo.tiny import TINY_TOKENIZER_DIR, randomize_, tiny_config

runner = CliRunner()
CODE = textwrap.dedent('''
    def fibonacci(n):
        """Return the n-th Fibonacci number."""
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a
''')
PROSE = ("The committee met on Tuesday to discuss the harbour, the new library and the price of bread. "
         "Nobody agreed, and the minutes were lost before anyone could read them. ")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze-cli")
    for name, text in (("code", CODE * 60), ("prose", PROSE * 40), ("small", "tiny text")):
        (root / name).mkdir()
        (root / name / "a.txt").write_text(text)
    tokenizer = train_tokenizer([CODE * 20], vocab_size=300, min_frequency=1)  # not the tiny models' tokenizer
    config = tiny_config("qwen3_moe")
    config.vocab_size = len(tokenizer)
    model = randomize_(AutoModelForCausalLM.from_config(config)).eval()
    model.save_pretrained(root / "other")
    save_tokenizer(tokenizer, root / "other")
    dense = AutoModelForCausalLM.from_config(Qwen3Config(vocab_size=384, hidden_size=32, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2,
                                                         num_key_value_heads=1, head_dim=16))
    dense.save_pretrained(root / "dense")
    for f in TINY_TOKENIZER_DIR.iterdir():
        (root / "dense" / f.name).write_bytes(f.read_bytes())
    return root


def _args(workspace, *extra):
    return ["analyze", *extra, "--samples", "8", "--seq-len", "64", "--threads", "1"]


def test_two_models_json_round_trips(workspace):
    """Both shipped reference models (streamed from their checkpoints; one tokenizer), side by side."""
    out = workspace / "report"
    data = f"{workspace / 'code'},{workspace / 'prose'}"
    result = runner.invoke(app, _args(workspace, "moekit/ref-fine", "moekit/ref-coarse", "-o", str(out),
                                      "--data", data, "--focus", str(workspace / "code"), "--candidates", "2",
                                      "--json"))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    stored = json.loads((out / "analysis.json").read_text())
    assert [m["summary"] for m in payload["models"]] == [a["summary"] for a in stored["analyses"]]
    assert [m["attribution"] for m in payload["models"]] == [a["attribution"] for a in stored["analyses"]]
    assert payload["comparison"] == stored["comparison"]
    assert [c["name"] for c in payload["corpora"]] == [str(workspace / "code"), str(workspace / "prose")]
    assert all((out / f).is_file() for f in payload["figures"]) and "figures/compare.png" in payload["figures"]
    assert len(payload["models"][0]["attribution"]["experts"]) == 2
    for model in payload["models"]:
        assert model["summary"]["moe_layers"] == 4 and 0 < model["summary"]["prefetch_recall"] <= 1
    again = runner.invoke(app, _args(workspace, "moekit/tiny-qwen3_moe", "-o", str(out), "--data", data))
    assert again.exit_code == 2 and "already exists" in again.output


@pytest.mark.parametrize("case, message", [
    ("tokenizers", "different tokenizer"),
    ("small", "at least 512 tokens"),
    ("dense", "not a Mixture-of-Experts"),
    ("missing", "missing"),
    ("three", "at most two"),
])
def test_refused_before_any_work(workspace, case, message):
    model, data = ["moekit/tiny-qwen3_moe"], str(workspace / "code")
    if case == "tokenizers":
        model.append(str(workspace / "other"))
    elif case == "small":
        data = str(workspace / "small")
    elif case == "dense":
        model = [str(workspace / "dense")]
    elif case == "missing":
        model = [str(workspace / "missing")]
    elif case == "three":
        model += ["moekit/tiny-mixtral", "moekit/tiny-olmoe"]
    out = workspace / f"out-{case}"
    result = runner.invoke(app, _args(workspace, *model, "-o", str(out), "--data", data))
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()



def test_a_redirected_focus_run_shows_every_step(workspace):
    """Without a terminal (a log file): after the masked forwards, each loss the attribution
    scores and the report being written are lines of their own (they were one silent
    stretch of 16 s on the reference model)."""
    out = workspace / "focus-report"
    result = runner.invoke(app, _args(workspace, "moekit/tiny-qwen3_moe", "-o", str(out), "--data",
                                      str(workspace / "code"), "--focus", str(workspace / "code"),
                                      "--candidates", "2"))
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0] == "threads: 1 (--threads)"
    steps = [line for line in lines if line.startswith("attribution ") and not line.endswith("s)")]
    # 3 layers, the unmasked loss, one loss per candidate: 6 steps, each its own line
    assert [s.split()[1] for s in steps] == [f"{n}/6" for n in range(1, 7)], lines
    assert "loss scored unmasked" in steps[3]
    assert all(" loss scored without expert " in s for s in steps[4:]), steps
    assert f"writing {out}: figures, report.html, analysis.json…" in lines
