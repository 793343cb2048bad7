"""The training loop: it learns, it resumes bit-for-bit, and it refuses bad input early."""

import json
import re

import pytest
import torch

from moekit.errors import MoekitError
from moekit.train import TrainConfig, build_model, evaluate, learning_rate, load_model_config, train
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


def test_resume_with_different_settings_is_refused_naming_each(tmp_path, rows):
    _run(tmp_path, rows, steps=3, warmup_steps=1)
    with pytest.raises(MoekitError, match=r"other settings \(batch_size 4 → 2, lr 0.01 → 0.005\)"):
        _run(tmp_path, rows, steps=5, warmup_steps=1, lr=5e-3, batch_size=2)
    with pytest.raises(MoekitError, match="already at step 3, past --steps 2"):
        _run(tmp_path, rows, steps=2, warmup_steps=1)


def _lrs(log):
    return [h["lr"] for h in log["history"]]


def test_more_steps_continue_a_finished_run_from_its_checkpoint(tmp_path, rows):
    """A finished run given more steps trains on from its last checkpoint at the schedule's
    floor; its first steps and their checkpoint are untouched."""
    model4, four = _run(tmp_path / "run", rows, steps=4, checkpoint_every=4)
    first = _curve(four)
    model6, six = _run(tmp_path / "run", rows, steps=6, checkpoint_every=4)
    assert six["resumed_from"] == 4 and six["extensions"] == [{"step": 4, "from": 4, "to": 6}]
    assert _curve(six)[:4] == first and [h["step"] for h in six["history"]] == [1, 2, 3, 4, 5, 6]
    assert _lrs(six)[4:] == pytest.approx([1e-3, 1e-3])  # min_lr_ratio 0.1 of lr 1e-2: no jump back up
    assert any(not torch.equal(a, b) for a, b in zip(model4.state_dict().values(), model6.state_dict().values()))
    _, again = _run(tmp_path / "run", rows, steps=6, checkpoint_every=4)  # finished: nothing runs
    assert again["resumed_from"] == 6 and _curve(again) == _curve(six)


def test_more_steps_mid_run_stretch_the_rest_of_the_schedule(tmp_path, rows):
    """Extended mid-run, the rate goes on from where it was and decays to the floor at the
    new end; extended during warmup, the run gets the schedule it would have had."""
    _, full = _run(tmp_path / "full", rows)

    def crash(step, record):
        if step == 5:
            raise _Crash

    with pytest.raises(_Crash):
        _run(tmp_path / "cut", rows, on_step=crash)  # checkpoint at step 3 of 8
    _, longer = _run(tmp_path / "cut", rows, steps=16)
    lrs = _lrs(longer)
    assert _curve(longer)[:3] == _curve(full)[:3] and len(lrs) == 16
    assert lrs[3] == pytest.approx(_lrs(full)[3], rel=1e-12) and all(a > b for a, b in zip(lrs[3:], lrs[4:]))
    schedule = dict(peak=1e-2, warmup=2, total=8, min_ratio=0.1, extensions=[(3, 16)])
    assert lrs == [learning_rate(step, **schedule) for step in range(16)]
    assert learning_rate(16, **schedule) == pytest.approx(1e-3)  # the floor at the new end

    with pytest.raises(_Crash):
        _run(tmp_path / "early", rows, on_step=crash, warmup_steps=4)  # checkpoint at 3, in the warmup
    _, early = _run(tmp_path / "early", rows, steps=16, warmup_steps=4)
    _, planned = _run(tmp_path / "planned", rows, steps=16, warmup_steps=4)
    assert _lrs(early) == pytest.approx(_lrs(planned), rel=1e-12)


def test_checkpoints_get_the_modes_the_umask_asks_for(tmp_path, rows):
    import os
    import stat

    previous = os.umask(0o022)
    try:
        _run(tmp_path, rows, steps=3)
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


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
    lrs = [learning_rate(s, peak=1.0, warmup=10, total=110, min_ratio=0.1) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_an_extended_schedule_never_jumps():
    def lr(step, extensions=()):
        return learning_rate(step, peak=1.0, warmup=10, total=110, min_ratio=0.1, extensions=extensions)

    # extended to 210 at step 60 (rate 0.55), then to 300 at step 150
    ext = [(60, 210), (150, 300)]
    assert [lr(s, ext) for s in range(60)] == [lr(s) for s in range(60)]
    assert lr(60, ext) == pytest.approx(0.55) and lr(135, ext[:1]) == pytest.approx(0.325)
    assert lr(150, ext) == pytest.approx(lr(150, ext[:1])) and lr(299, ext) == pytest.approx(0.1, abs=1e-4)
    assert all(a >= b for a, b in zip([lr(s, ext) for s in range(10, 300)], [lr(s, ext) for s in range(11, 300)]))
    assert lr(150, [(110, 200)]) == pytest.approx(0.1)  # extended after the end: stays at the floor
    stretched = [lr(s, [(5, 210)]) for s in range(210)]  # extended during the warmup: as if planned
    planned = [learning_rate(s, peak=1.0, warmup=10, total=210, min_ratio=0.1) for s in range(210)]
    assert stretched == pytest.approx(planned, rel=1e-12)


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


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_router_only_training_moves_the_routers_and_nothing_else(tmp_path, rows, family):
    from moekit.train.config import routed_layers

    before = build_model(load_model_config(tiny_spec(family)), seed=0).state_dict()
    model, _ = _run(tmp_path, rows, family, train_only="routers", steps=12, checkpoint_every=12, eval_every=12)
    router_ids = {id(layer.router.weight) for layer in routed_layers(model)}
    names = {name for name, p in model.named_parameters() if id(p) in router_ids}
    assert len(names) == len(routed_layers(model))
    after = model.state_dict()
    for name, value in after.items():
        if name in names:
            assert not torch.equal(value, before[name]), name
        elif not name.endswith("e_score_correction_bias"):  # moved by the bias rule, not by gradients
            assert torch.equal(value, before[name]), name


def test_router_only_training_refuses_a_dense_model(tmp_path, rows):
    model = build_model(load_model_config({**tiny_spec("qwen3"), "intermediate_size": 32}), seed=0)
    with pytest.raises(MoekitError, match="no router to train"):
        train(model, train_rows=rows, eval_rows=None, config=TrainConfig(steps=2, warmup_steps=0, batch_size=4,
              train_only="routers"), out_dir=tmp_path, show_progress=False)


def test_a_run_from_before_a_setting_existed_resumes_with_its_default(tmp_path, rows):
    from moekit.train.trainer import check_resumable

    config = TrainConfig(steps=8, warmup_steps=2)
    saved = {k: v for k, v in config.model_dump(mode="json").items() if k != "train_only"}
    check_resumable(tmp_path, {"log": {"config": saved}, "step": 4}, config)
    with pytest.raises(MoekitError, match="train_only all → routers"):
        check_resumable(tmp_path, {"log": {"config": saved}, "step": 4}, config.model_copy(update={"train_only": "routers"}))


def test_mlp_only_training_keeps_attention_embeddings_and_norms(tmp_path, rows):
    config = load_model_config({**tiny_spec("qwen3"), "intermediate_size": 32})
    before = build_model(config, seed=0).state_dict()
    model = build_model(config, seed=0)
    train(model, train_rows=rows, eval_rows=None, config=TrainConfig(steps=4, warmup_steps=0, batch_size=4,
          lr=1e-2, train_only="mlp"), out_dir=tmp_path, show_progress=False)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]) != (".mlp." in name), name
