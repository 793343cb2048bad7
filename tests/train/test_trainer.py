"""The training loop: it learns, it resumes bit-for-bit, and it refuses bad input early."""

import json
import re

import pytest
import torch

from moekit.errors import MoekitError
from moekit.train import TrainConfig, build_model, evaluate, load_model_config, train
from moekit.train.checkpoint import list_checkpoints

from .conftest import tiny_spec


def _run(tmp_path, rows, family="qwen3_moe", on_step=None, **overrides):
    # Mixtral's router jitter draws from torch's RNG during training: resume must restore it.
    extra = {"router_jitter_noise": 0.1} if family == "mixtral" else {}
    config = load_model_config(tiny_spec(family, extra=extra))
    model = build_model(config, seed=0)
    settings = dict(steps=8, batch_size=4, lr=1e-2, warmup_steps=2, checkpoint_every=3, eval_every=4, eval_rows=8)
    tc = TrainConfig(**{**settings, **overrides})
    log = train(model, train_rows=rows, eval_rows=rows[:8], config=tc, out_dir=tmp_path, show_progress=False,
                on_step=on_step)
    return model, log


def test_a_few_steps_lower_the_loss(tmp_path, rows):
    model, log = _run(tmp_path, rows, steps=30, checkpoint_every=30, eval_every=30)
    losses = [h["loss"] for h in log["history"]]
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    assert evaluate(model, rows[:8]).loss < log["history"][0]["loss"] - 0.5
    saved = json.loads((tmp_path / "train_log.json").read_text())
    assert len(saved["history"]) == 30 and {"loss", "aux_loss", "z_loss", "imbalance", "tokens_per_s"} <= set(
        saved["history"][0])


class _Crash(Exception):
    pass


def _curve(log):
    return [(h["step"], h["loss"], h["aux_loss"], h["z_loss"], h["grad_norm"], h["lr"]) for h in log["history"]]


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_resume_after_a_crash_reproduces_the_uninterrupted_run_exactly(tmp_path, rows, family):
    overrides = dict(grad_accum=2, bias_update_rate=1e-2 if family == "deepseek_v3" else 0.0)
    full_model, full = _run(tmp_path / "full", rows, family, **overrides)

    def crash(step, record):
        if step == 5:  # after the checkpoint at step 3, before the one at 6
            raise _Crash

    with pytest.raises(_Crash):
        _run(tmp_path / "cut", rows, family, on_step=crash, **overrides)
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step-000003"]
    resumed_model, resumed = _run(tmp_path / "cut", rows, family, **overrides)
    assert _curve(resumed) == _curve(full)  # exact equality, not approximate
    assert resumed["evals"] == full["evals"]
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    if family == "deepseek_v3":
        bias = full_model.model.layers[0].mlp.gate.e_score_correction_bias
        assert bias.abs().sum() > 0  # the aux-loss-free update ran, and was restored on resume


def test_resume_with_different_settings_is_refused(tmp_path, rows):
    _run(tmp_path, rows, steps=3)
    with pytest.raises(MoekitError, match="different training config"):
        _run(tmp_path, rows, steps=3, lr=5e-3)


def test_data_smaller_than_one_batch_is_refused(tmp_path, rows):
    with pytest.raises(MoekitError, match="fewer than one batch"):
        _run(tmp_path, rows[:2], batch_size=4)


def test_bias_update_needs_a_correction_bias(tmp_path, rows):
    with pytest.raises(MoekitError, match="correction bias"):
        _run(tmp_path, rows, family="mixtral", bias_update_rate=1e-3)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"steps": 10, "warmup_steps": 10}, "warmup_steps (10) must be below steps (10)"),
        ({"betas": (0.9, 1.0)}, "betas.1: Input should be less than 1 (got 1.0)"),
        ({"min_lr_ratio": 1.5}, "min_lr_ratio: Input should be less than or equal to 1 (got 1.5)"),
        ({"grad_clip": 0}, "grad_clip: Input should be greater than 0 (got 0)"),
        ({"steps": 0, "lr": 0}, "steps: Input should be greater than or equal to 1 (got 0); lr: Input should be greater than 0"),
    ],
)
def test_bad_training_settings_name_the_field_and_value(settings, message):
    with pytest.raises(MoekitError, match="^invalid training setting: .*" + re.escape(message)):
        TrainConfig.checked(**settings)


def test_learning_rate_schedule():
    from moekit.train import learning_rate

    lrs = [learning_rate(s, peak=1.0, warmup=10, total=110, min_ratio=0.1) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_without_a_terminal_progress_is_printed_as_plain_lines(tmp_path, rows):
    """Under nohup or a batch scheduler a bar cannot redraw: lines carry the same figures."""
    import io
    import re

    from rich.console import Console

    out = io.StringIO()
    config = load_model_config(tiny_spec("qwen3_moe"))
    tc = TrainConfig(steps=100, batch_size=4, lr=1e-2, warmup_steps=2, checkpoint_every=100, eval_every=100,
                     eval_rows=8)
    log = train(build_model(config, seed=0), train_rows=rows, eval_rows=rows[:8], config=tc, out_dir=tmp_path,
                console=Console(file=out, force_terminal=False, width=200), show_progress=True)
    lines = re.findall(r"^train (\d+)/100 .* loss (\d+\.\d+) ", out.getvalue(), flags=re.M)
    assert [int(step) for step, _ in lines] == list(range(2, 101, 2))  # every 2% of the run
    assert all(abs(float(loss) - log["history"][int(step) - 1]["loss"]) <= 5e-5 for step, loss in lines)
