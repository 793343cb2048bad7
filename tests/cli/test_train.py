"""`moekit train`: a tiny end-to-end run with --json, and one-line errors for bad input."""

import json

import pytest
import torch
from typer.testing import CliRunner

torch.set_num_threads(1)
import moekit  # noqa: E402
from moekit.cli import app  # noqa: E402
from tests.training_inputs import TINY_SPEC, write_corpus

runner = CliRunner()
TINY = TINY_SPEC


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def _invoke(*args):
    result = runner.invoke(app, ["train", *map(str, args)])
    result.flat = " ".join(result.output.split())  # rich wraps long lines
    return result


def test_tiny_run_writes_a_loadable_model_and_resumes(tmp_path, corpus):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(TINY))
    args = ["--arch", spec, "--data", corpus, "--vocab-size", 300, "--seq-len", 32, "--steps", 6,
            "--batch-size", 4, "--checkpoint-every", 3, "--eval-every", 3, "--out", tmp_path / "run", "--json"]
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["steps"] == 6 and not summary["interrupted"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(summary["model_dir"])
    tok = AutoTokenizer.from_pretrained(summary["model_dir"])
    assert model.config.model_type == "olmoe" and model.config.vocab_size == len(tok)
    again = _invoke(*args)  # everything done: resumes at step 6 and stops
    assert again.exit_code == 0 and json.loads(again.stdout[again.stdout.index("{"):])["steps"] == 6
    # Continue training the saved model (healing / continued pretraining): its tokenizer is reused.
    more = _invoke("--init", summary["model_dir"], "--data", corpus, "--seq-len", 32, "--steps", 2,
                   "--batch-size", 4, "--out", tmp_path / "more", "--json")
    assert more.exit_code == 0, more.output
    assert (tmp_path / "more" / "tokenizer" / "tokenizer.json").read_text() == (
        tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text()
    # a trained model continues at a low peak lr unless told (higher ones hurt: benchmarks/build.py)
    lrs = [json.loads((tmp_path / run / "train_log.json").read_text())["config"]["lr"] for run in ("run", "more")]
    assert lrs == [2e-3, 1e-4]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/no/such/dir"], "no such file or directory"),
        (["--arch", "transformer-xl"], "unknown architecture"),
        (["--seq-len", 100000], "fewer than one sequence"),
        (["--steps", 0], "Invalid value for '--steps': Input should be greater than or equal to 1"),
        (["--lr", -1], "Invalid value for '--lr': must be a finite number greater than 0 (got -1)"),
        (["--aux-loss-coef", -0.1], "Invalid value for '--aux-loss-coef': must be a finite number at least 0 (got -0.1)"),
        (["--threads", 0], "--threads must be at least 1 (got 0)"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, corpus, args, message):
    result = _invoke("--data", corpus, "--vocab-size", 300, "--out", tmp_path / "run", *args)
    assert result.exit_code == 2
    assert message in result.flat and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # refused before any data was prepared


def test_empty_corpus_and_bad_topk(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    assert "holds no text" in _invoke("--data", empty, "--out", tmp_path / "r1").flat
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: mixtral\nnum_experts: 4\ntop_k: 6\n")
    result = _invoke("--arch", bad, "--out", tmp_path / "r2")
    assert result.exit_code == 2 and "top-k (6)" in result.flat


def test_continuing_a_model_with_per_layer_expert_counts_keeps_them(tmp_path, corpus):
    """Healing a model pruned with a global budget: it loads from moekit's non-uniform
    format, trains, and is saved in that format again with its counts."""
    import shutil

    from moekit.arch.edit import experts_per_layer
    from moekit.io.nonuniform import is_nonuniform, write_nonuniform

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(TINY))
    first = _invoke("--arch", spec, "--data", corpus, "--vocab-size", 300, "--seq-len", 32, "--steps", 2,
                    "--batch-size", 4, "--out", tmp_path / "run", "--json")
    assert first.exit_code == 0, first.output
    model = moekit.load(tmp_path / "run" / "model")
    moekit.keep_experts(model, {0: [0, 2, 3]})
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    write_nonuniform(model, pruned)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "run" / "model" / name, pruned / name)

    more = _invoke("--init", pruned, "--data", corpus, "--seq-len", 32, "--steps", 2, "--batch-size", 4,
                   "--out", tmp_path / "more", "--json")
    assert more.exit_code == 0, more.output
    healed_dir = tmp_path / "more" / "model"
    assert is_nonuniform(healed_dir)
    healed = moekit.load(healed_dir)
    assert experts_per_layer(healed) == {0: 3, 1: 4}
    before, after = dict(model.named_parameters()), dict(healed.named_parameters())
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


def test_continuing_a_bf16_model_saves_bf16_unless_told_otherwise(tmp_path, corpus):
    from moekit.io.load import stored_dtype

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(TINY))
    first = _invoke("--arch", spec, "--data", corpus, "--vocab-size", 300, "--seq-len", 32, "--steps", 2,
                    "--batch-size", 4, "--out", tmp_path / "run", "--json")
    assert first.exit_code == 0, first.output
    assert stored_dtype(tmp_path / "run" / "model") == torch.float32  # from scratch: fp32
    bf16 = tmp_path / "bf16"
    tokenizer = moekit.data.load_tokenizer(tmp_path / "run" / "model")
    moekit.save(moekit.load(tmp_path / "run" / "model"), bf16, tokenizer=tokenizer, dtype=torch.bfloat16)
    common = ("--init", bf16, "--data", corpus, "--seq-len", 32, "--steps", 2, "--batch-size", 4, "--json")
    healed = _invoke(*common, "--out", tmp_path / "healed")
    assert healed.exit_code == 0, healed.output
    assert stored_dtype(tmp_path / "healed" / "model") == torch.bfloat16
    wide = _invoke(*common, "--out", tmp_path / "wide", "--dtype", "float32")
    assert wide.exit_code == 0, wide.output
    assert stored_dtype(tmp_path / "wide" / "model") == torch.float32
    bad = _invoke(*common, "--out", tmp_path / "bad", "--dtype", "int8")
    assert bad.exit_code == 2 and "dtype 'int8' is not one of auto, bfloat16, float16, float32" in bad.flat
    assert not (tmp_path / "bad").exists()
