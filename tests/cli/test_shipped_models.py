"""Every model that ships with moekit works with every command, by the name the README and
the error messages give it, with no --tokenizer: the tiny models share a shipped tokenizer
whose vocabulary is theirs, and have the positions the commands' defaults need."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import moekit
from moekit.cli import app
from moekit.io.tokenizer import tokenizer_for
from moekit.build.upcycle import TARGETS
from moekit.io.load import load_config, reference_names
from moekit.train import FAMILIES as TRAINABLE

runner = CliRunner()
NAMES = reference_names()
README = Path(__file__).resolve().parents[2] / "README.md"
DOCS = [README, *sorted((README.parent / "docs").glob("*.md"))]  # the README and its guides
EVALUATED = {"moekit/tiny-deepseek_v3", "moekit/tiny-gpt_oss"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small corpus: a whole shipped split would be tokenized once per command and model."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "code.py").write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(300)))
    return root / "code.py"


def _run(*args) -> dict:
    result = runner.invoke(app, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout[result.stdout.index("{"):])


def test_every_name_is_listed_and_loads_with_its_own_tokenizer():
    assert {"moekit/ref-fine", "moekit/ref-coarse"} <= set(NAMES)
    assert len([n for n in NAMES if n.startswith("moekit/tiny-")]) == 14
    for name in NAMES:
        config = load_config(name)
        tokenizer = tokenizer_for(name)
        assert len(tokenizer) == config.vocab_size, name  # every id it makes has an embedding
        assert config.max_position_embeddings >= 256, name  # the commands' default sequence length


def test_every_moekit_name_in_the_readme_and_docs_loads():
    for page in DOCS:
        named = set(re.findall(r"(?<![\w/.])moekit/[\w.<>-]*[\w>]", page.read_text()))  # not src/moekit/eval
        assert page != README or "moekit/tiny-deepseek_v3" in named
        for name in named - {"moekit/tiny-<family>"}:
            assert name in NAMES, f"{page.name} names {name}, which does not load"
    assert all(f"`{name}`" in README.read_text() for name in NAMES if name.startswith("moekit/tiny-"))


def _said(output: str) -> list[str]:
    """The lines a command printed besides the first one that names its CPU threads."""
    return [line for line in output.strip().splitlines() if not line.startswith("threads: ")]


def _is_dense(name: str) -> bool:
    return load_config(name).model_type in TARGETS


MOE_NAMES = [n for n in NAMES if not _is_dense(n)]


@pytest.mark.parametrize("name", MOE_NAMES)
def test_every_command_runs_on_every_shipped_model(name, corpus, tmp_path):
    few = ["--data", corpus, "--samples", 2, "--seq-len", 16]
    summary = _run("inspect", name)
    assert summary["model"] == name and summary["total_params"] > 0

    stats = _run("calibrate", name, "-o", tmp_path / "stats", *few, "--statistics", "frequency")
    assert stats["tokens"] == 2 * 16

    scores = _run("eval", name, "--data", corpus, "--context-length", 32, "--stride", 16, "--max-tokens", 64)
    assert scores["models"][name]["tokens"] == 64  # 4 windows of --stride 16

    planned = _run("compress", name, "--plan")
    # --eval tokenizes all of stdlib:eval and scores 128 rows of 256 tokens twice, whatever the model:
    # 5 s on a tiny model, a minute on a reference; two families (dense first layers and
    # groups; transposed experts) show the path, which holds nothing family-specific.
    evaluate = name in EVALUATED
    report = _run("compress", name, "-o", tmp_path / "out", *few, *(["--eval"] if evaluate else []))
    assert report["after"]["bytes"] == planned["after"]["bytes"] < report["before"]["bytes"]
    assert ("eval" in report["after"]) == evaluate
    assert moekit.load(tmp_path / "out").config.vocab_size == load_config(name).vocab_size
    assert (tmp_path / "out" / "tokenizer.json").is_file()

    train = ["train", "--init", name, "--data", corpus, "--steps", 1, "--seq-len", 16, "--batch-size", 2,
             "-o", tmp_path / "run"]
    if load_config(name).model_type in TRAINABLE:
        assert _run(*train)["steps"] == 1
        assert (tmp_path / "run" / "model" / "tokenizer.json").read_text() == (
            Path(tokenizer_for(name).name_or_path) / "tokenizer.json").read_text()
    else:
        result = runner.invoke(app, list(map(str, train)))
        assert result.exit_code == 2 and "moekit trains" in result.output and len(_said(result.output)) == 1
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", [n for n in NAMES if _is_dense(n)])
def test_a_shipped_dense_model_builds_moes_and_the_moe_commands_say_so(name, corpus, tmp_path):
    """A dense reference is where upcycle and split start; inspect describes it, and the
    compression commands refuse it in one line that names them, before any output appears."""
    assert _run("inspect", name)["routed_params"] == 0
    result = runner.invoke(app, ["compress", name, "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and "moekit upcycle" in result.output, result.output
    assert len(_said(result.output)) == 1
    assert not (tmp_path / "out").exists()
    scores = _run("eval", name, "--data", corpus, "--context-length", 32, "--stride", 16, "--max-tokens", 64)
    assert scores["models"][name]["tokens"] == 64  # 4 windows of --stride 16
    # the shared-expert family (qwen3_moe, the default, is tested in tests/build); then healed
    built = _run("upcycle", name, "-o", tmp_path / "moe", "--experts", 4, "--top-k", 2, "--family", "glm4_moe")
    assert built["max_abs_logit_difference"] < 1e-4
    assert load_config(tmp_path / "moe").model_type == "glm4_moe"
    assert _run("inspect", tmp_path / "moe")["total_params"] > 0
    healed = _run("train", "--init", tmp_path / "moe", "--data", corpus, "--steps", 2, "--seq-len", 16,
                  "--batch-size", 2, "-o", tmp_path / "run")
    assert healed["steps"] == 2
    before, after = (moekit.load(f).model.layers[0].mlp.gate.e_score_correction_bias
                     for f in (tmp_path / "moe", tmp_path / "run" / "model"))
    assert before.abs().sum() == 0 < after.abs().sum()  # the aux-loss-free balancing ran by default
