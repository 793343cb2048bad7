"""`moekit train` rerun on an existing run: finished, extended, or refused with every
setting that differs named."""

import json

import pytest
from typer.testing import CliRunner

from moekit.cli import app

from .conftest import tiny_spec
from tests.training_inputs import write_corpus, write_spec


@pytest.fixture
def command(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    spec = write_spec(tmp_path / "spec.json", tiny_spec("olmoe", vocab_size=300))
    return ["train", "--arch", spec, "--data", corpus, "--vocab-size", 300, "--seq-len", 32, "--batch-size", 4,
            "--checkpoint-every", 2, "--eval-every", 2, "--threads", 1, "--out", tmp_path / "run"]


def _train(command, *args):
    result = CliRunner().invoke(app, [*map(str, command), *map(str, args)])
    result.flat = " ".join(result.output.split())  # rich wraps long lines
    return result


def test_a_finished_run_says_so_and_more_steps_continue_it(command, tmp_path):
    first = _train(command, "--steps", 2)
    assert first.exit_code == 0 and "done model in" in first.flat
    again = _train(command, "--steps", 2)
    assert again.exit_code == 0, again.output
    assert f"already finished at step 2; model in {tmp_path / 'run' / 'model'}" in again.flat
    assert "nan" not in again.output
    more = _train(command, "--steps", 4, "--json")
    assert more.exit_code == 0, more.output
    summary = json.loads(more.stdout[more.stdout.index("{"):])
    assert summary["steps"] == 4 and not summary["already_finished"]
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert [h["step"] for h in log["history"]] == [1, 2, 3, 4] and log["resumed_from"] == 2
    assert log["extensions"] == [{"step": 2, "from": 2, "to": 4}] and log["config"]["warmup_steps"] == 1


def test_other_settings_are_refused_before_any_work(command, tmp_path):
    assert _train(command, "--steps", 2).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")}
    refused = _train(command, "--steps", 3, "--lr", 0.01, "--grad-accum", 2)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "other settings (grad_accum 1 → 2, lr 0.002 → 0.01)" in refused.flat
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*")} == before


def test_a_dense_model_trains_with_no_router_losses_and_continues_from_its_own_checkpoint(tmp_path):
    """The dense reference's family (Qwen3): router losses are zero, the load columns say
    balanced, and a finished model is a valid --init."""
    from moekit.train.config import ModelSpec

    corpus = write_corpus(tmp_path / "corpus")
    spec = ModelSpec(family="qwen3", vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    arch = write_spec(tmp_path / "dense.json", spec.model_dump())
    common = ["--data", corpus, "--vocab-size", 300, "--seq-len", 32, "--batch-size", 4, "--checkpoint-every", 2,
              "--eval-every", 2, "--threads", 1, "--steps", 2]
    first = _train(["train", "--arch", arch, *common, "--out", tmp_path / "run"])
    assert first.exit_code == 0, first.output
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert all(h["aux_loss"] == 0 and h["z_loss"] == 0 and h["imbalance"] == 1 for h in log["history"])
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["intermediate_size"] == 64
    again = _train(["train", "--init", tmp_path / "run" / "model", *common, "--out", tmp_path / "more"])
    assert again.exit_code == 0, again.output


def test_intermediate_size_belongs_to_dense_families_only():
    from pydantic import ValidationError

    from moekit.train.config import ModelSpec

    with pytest.raises(ValidationError, match="dense family"):
        ModelSpec(family="qwen3")
    with pytest.raises(ValidationError, match="dense family"):
        ModelSpec(family="qwen3_moe", intermediate_size=64)
