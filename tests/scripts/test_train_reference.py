"""The reference-model script's bookkeeping: stages joined into one curve, the flatness
check, and the criteria a model must pass before it is published."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_reference.py"


@pytest.fixture(scope="module")
def tr():
    spec = importlib.util.spec_from_file_location("train_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stage(folder: Path, steps: int, evals: list[tuple[int, float]]) -> None:
    folder.mkdir(parents=True)
    log = {"config": {"steps": steps}, "meta": {}, "history": [{"step": s, "loss": 1.0} for s in range(1, steps + 1)],
           "evals": [{"step": s, "loss": loss} for s, loss in evals]}
    (folder / "train_log.json").write_text(json.dumps(log))


def test_stages_join_into_one_curve_over_global_steps(tr, tmp_path):
    _stage(tmp_path / "stage-1", 4, [(2, 3.0), (4, 2.0)])
    _stage(tmp_path / "stage-2", 6, [(3, 2.2), (6, 1.9)])
    log = tr.combined_log(tmp_path, 2)
    assert [s["first_step"] for s in log["stages"]] == [1, 5]
    assert [e["step"] for e in log["evals"]] == [2, 4, 7, 10]
    assert [h["step"] for h in log["history"]] == list(range(1, 11))


def test_flatness_is_the_fall_from_the_eval_nearest_seven_eighths(tr):
    curve = [{"step": s, "eval_loss": loss} for s, loss in [(400, 3.0), (700, 2.0), (750, 1.99), (800, 1.98)]]
    assert tr.last_eighth_drop(curve) == pytest.approx((2.0 - 1.98) / 2.0)  # 7/8 of 800 is 700
    curve[1]["step"] = 600  # now 750 is the nearest to 700
    assert tr.last_eighth_drop(curve) == pytest.approx((1.99 - 1.98) / 1.99)


@pytest.mark.parametrize("perplexity, min_load, last_loss, passes", [
    (50.0, 0.5, 1.995, True),
    (90.0, 0.5, 1.995, False),   # not below 1/8 of the unigram's 649
    (50.0, 0.2, 1.995, False),   # an expert under a quarter of its fair share
    (50.0, 0.5, 1.90, False),    # still falling 5% over the last eighth
])
def test_a_model_is_published_only_when_every_criterion_holds(tr, perplexity, min_load, last_loss, passes):
    curve = [{"step": 700, "eval_loss": 2.0}, {"step": 800, "eval_loss": last_loss}]
    assert tr.criteria(perplexity, 649.0, min_load, curve)["pass"] is passes


def test_every_stage_of_every_recipe_is_complete(tr):
    keys = {"steps", "lr", "warmup", "checkpoint_every", "eval_every", "seed", "batch_size", "grad_accum",
            "aux_loss_coef", "z_loss_coef", "bias_update_rate"}
    for name, stages in tr.RECIPES.items():
        assert all(set(stage) == keys for stage in stages), name
        assert len({stage["seed"] for stage in stages}) == len(stages)  # each stage its own data order
