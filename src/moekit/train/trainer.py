"""The training loop: AdamW, warmup + cosine, clipping, accumulation, router losses,
aux-loss-free bias updates, checkpoints and exact resume.

The loss that is optimised is written out in full, every term with its coefficient:

    loss = CE + aux_loss_coef · mean_layers L_aux + z_loss_coef · mean_layers L_z

with L_aux and L_z from `moekit.train.losses`, computed on router logits captured by
hooks (`RouterCapture`); the HF model's own aux loss stays off (``output_router_logits``
is False and is asserted to have added nothing). DeepSeek-V3-style correction biases
move by ``bias_update_rate`` after each optimizer step.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.console import Console
from torch import nn

from moekit.train.config import routed_layers
from moekit.errors import MoekitError, setting, validation_problems
from moekit.io.save import write_json_atomically
from moekit.train.capture import RouterCapture
from moekit.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from moekit.train.evaluate import evaluate
from moekit.train.losses import aux_free_bias_update, load_balancing_loss, router_probabilities, router_z_loss
from moekit.train.progress import TrainProgress
from moekit.train.stream import BatchStream, learning_rate


class TrainConfig(BaseModel):
    """Optimisation settings. One step = ``grad_accum`` micro-batches of ``batch_size`` rows.

    Every field is range-checked when the config is built, so a bad setting fails before
    any data is prepared or any weight is touched.
    """

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=50, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    grad_clip: float = Field(default=1.0, gt=0)
    aux_loss_coef: float = Field(default=0.01, ge=0)
    z_loss_coef: float = Field(default=1e-3, ge=0)
    bias_update_rate: float = Field(default=0.0, ge=0)
    checkpoint_every: int = Field(default=200, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    eval_every: int = Field(default=200, ge=1)
    eval_rows: int = Field(default=64, ge=1)
    seed: int = Field(default=0, ge=0)
    train_only: Literal["all", "routers", "mlp"] = "all"

    @model_validator(mode="after")
    def _warmup_inside_the_run(self) -> TrainConfig:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        return self

    @classmethod
    def checked(cls, **settings: Any) -> TrainConfig:
        """Build from user settings; a bad one raises MoekitError naming the field and its value."""
        try:
            return cls(**settings)
        except ValidationError as exc:
            raise MoekitError(f"invalid training setting: {validation_problems(exc)}; fix it and retry.") from None


def train(
    model: nn.Module,
    *,
    train_rows: torch.Tensor,
    eval_rows: torch.Tensor | None,
    config: TrainConfig,
    out_dir: Path,
    console: Console | None = None,
    show_progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place on ``train_rows`` [N, L]; resume if ``out_dir`` has checkpoints.

    ``on_step(step, record)`` is called after every step (tests use it to interrupt).
    A run may be resumed with a different ``steps`` (see `check_resumable`); the schedule
    then continues as `learning_rate` describes, recorded in the log's ``extensions``.
    Returns the log: ``{"config", "meta", "history", "evals", "interrupted", "resumed_from",
    ...}``.
    """
    if train_rows.shape[0] < config.batch_size:
        raise MoekitError(
            f"the training data has {train_rows.shape[0]} sequences, fewer than one batch of "
            f"{config.batch_size}; add data or lower --batch-size / --seq-len."
        )
    layers = routed_layers(model)
    biased = [layer for layer in layers if layer.router.correction_bias is not None]
    if config.bias_update_rate > 0 and not biased:
        raise MoekitError("bias_update_rate > 0 needs routers with a correction bias (deepseek_v3, glm4_moe); set it to 0.")
    if config.train_only == "routers":
        freeze_all_but_routers(model, layers)
    elif config.train_only == "mlp":
        freeze_all_but_mlps(model)
    model.train()
    optimizer = torch.optim.AdamW(
        _param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas, foreach=True
    )
    stream = BatchStream(train_rows, batch_size=config.batch_size, seed=config.seed)
    ckpt_dir = out_dir / "checkpoints"
    log: dict[str, Any] = {"config": config.model_dump(mode="json"), "meta": meta or {}, "history": [], "evals": []}
    step = 0
    if checkpoints := list_checkpoints(ckpt_dir):
        state = load_checkpoint(checkpoints[-1], model=model, optimizer=optimizer)
        check_resumable(out_dir, state, config)
        stream.load_state_dict(state["stream"])
        log, step = state["log"], state["step"]
        if log["config"]["steps"] != config.steps:
            log.setdefault("extensions", []).append({"step": step, "from": log["config"]["steps"],
                                                     "to": config.steps})
            log["config"] = config.model_dump(mode="json")
    else:
        torch.manual_seed(config.seed)
    log["resumed_from"] = step
    schedule = dict(peak=config.lr, warmup=config.warmup_steps, total=first_steps(log),
                    min_ratio=config.min_lr_ratio, extensions=[(e["step"], e["to"]) for e in log.get("extensions", [])])
    if eval_rows is not None and eval_rows.shape[0] > config.eval_rows:
        # Evenly spaced rows: a prefix would be the first few files only.
        eval_rows = eval_rows[torch.linspace(0, eval_rows.shape[0] - 1, config.eval_rows).long()]
    stop = _StopFlag()
    # a finished run has nothing to show: its bar would hold no figures
    progress = TrainProgress(total=config.steps, start=step, console=console,
                             enabled=show_progress and step < config.steps)
    tokens_per_step = config.batch_size * config.grad_accum * train_rows.shape[1]
    with stop, progress, RouterCapture(model) as cap:
        while step < config.steps and not stop.requested:
            t0 = time.perf_counter()
            record = _train_step(model, optimizer, stream, cap, config, learning_rate(step, **schedule), biased)
            step += 1
            record.update(step=step, seconds=time.perf_counter() - t0)
            record["tokens_per_s"] = tokens_per_step / record["seconds"]
            log["history"].append(record)
            if eval_rows is not None and (step % config.eval_every == 0 or step == config.steps):
                result = evaluate(model, eval_rows, batch_size=config.batch_size)
                log["evals"].append({"step": step, "loss": result.loss, "perplexity": result.perplexity,
                                     "min_load_ratio": result.min_load_ratio()})
                load = f", least-used expert {result.min_load_ratio():.2f} of its fair share" if layers else ""
                progress.note(f"step {step}: eval loss {result.loss:.4f} (ppl {result.perplexity:.1f}{load})")
                write_log(out_dir, log)
            progress.advance(record)
            if step % config.checkpoint_every == 0 or step == config.steps or stop.requested:
                save_checkpoint(ckpt_dir, step=step, model=model, optimizer=optimizer,
                                state={"stream": stream.state_dict(), "log": log}, keep=config.keep_checkpoints)
                write_log(out_dir, log)
            if on_step is not None:
                on_step(step, record)
    log["interrupted"] = step < config.steps
    write_log(out_dir, log)
    return log


def freeze_all_but_routers(model: nn.Module, layers: list) -> None:
    """Leave only the routers' weights (and biases) trainable: the cheap healing step after
    `moekit combine` or an upcycle, where the experts already know their work and only the
    assignment of tokens to them is new (BTX's router-only phase)."""
    if not layers:
        raise MoekitError(f"{setting('train_only', 'routers')} needs an MoE model; this one has no router to train.")
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in layers:
        for param in (layer.router.weight, layer.router.bias):
            if param is not None:
                param.requires_grad_(True)


def freeze_all_but_mlps(model: nn.Module) -> None:
    """Leave only each decoder layer's MLP sublayer trainable (a dense MLP, or an MoE block
    with its router): branches of one seed trained this way keep the seed's attention, so
    `moekit combine` loses nothing by averaging it (Branch-Train-MiX's weak point)."""
    from moekit.arch.discover import decoder_stack

    _, layers_path = decoder_stack(model)
    mlps = [getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
            for layer in model.get_submodule(layers_path)]
    if any(mlp is None for mlp in mlps):
        raise MoekitError(f"{setting('train_only', 'mlp')}: a decoder layer of this model has no MLP sublayer (mlp or "
                          "block_sparse_moe).")
    for param in model.parameters():
        param.requires_grad_(False)
    for mlp in mlps:
        for param in mlp.parameters():
            param.requires_grad_(True)


def check_resumable(out_dir: Path, state: dict[str, Any], config: TrainConfig) -> None:
    """Refuse to resume the run whose checkpoint ``state`` holds with ``config`` unless only
    ``steps`` differs and is not below the checkpoint's step. Anything else would change the
    optimisation the checkpoint is part of, so the message names every setting that differs."""
    # a setting added after the run started reads as its default
    defaults = TrainConfig().model_dump(mode="json")
    saved, new = defaults | state["log"]["config"], config.model_dump(mode="json")
    changed = [f"{key} {saved.get(key)} → {new.get(key)}" for key in sorted(set(saved) | set(new))
               if key != "steps" and saved.get(key) != new.get(key)]
    if changed:
        raise MoekitError(f"{out_dir} holds a run with other settings ({', '.join(changed)}); resume with the "
                          "run's settings (only the step count may change) or choose a new --out.")
    if config.steps < state["step"]:
        raise MoekitError(f"{out_dir} holds a run already at step {state['step']}, past --steps {config.steps}; "
                          f"give at least {state['step']}.")


def first_steps(log: dict[str, Any]) -> int:
    """The step count a run started with: its first cosine schedule ends there."""
    extensions = log.get("extensions")
    return extensions[0]["from"] if extensions else log["config"]["steps"]


def _train_step(model, optimizer, stream, cap, config, lr, biased) -> dict[str, Any]:
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums = {"loss": 0.0, "aux_loss": 0.0, "z_loss": 0.0}
    counts: dict[int, torch.Tensor] = {}
    for _ in range(config.grad_accum):
        batch = stream.next()
        cap.clear()
        out = model(input_ids=batch, labels=batch)
        if getattr(out, "aux_loss", None) is not None:
            raise RuntimeError("the HF model added its own aux loss; moekit adds router losses explicitly")
        aux = z = out.loss.new_zeros(())  # a dense model has no router to balance
        if cap.records:
            aux = torch.stack([load_balancing_loss(router_probabilities(r.logits, r.scoring), r.top_k_index)
                               for r in cap.records]).mean()
            z = torch.stack([router_z_loss(r.logits) for r in cap.records]).mean()
        total = out.loss + config.aux_loss_coef * aux + config.z_loss_coef * z
        (total / config.grad_accum).backward()
        for name, value in (("loss", out.loss), ("aux_loss", aux), ("z_loss", z)):
            sums[name] += float(value.detach()) / config.grad_accum
        for r in cap.records:
            c = torch.bincount(r.top_k_index.reshape(-1), minlength=r.logits.shape[-1]).double()
            counts[r.layer] = counts.get(r.layer, 0) + c
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for layer in biased:
        if config.bias_update_rate > 0:
            aux_free_bias_update(layer.router.correction_bias, counts[layer.index], config.bias_update_rate)
    # per layer [E_l], 1 = fair share (E_l may differ); a dense model is balanced by definition
    loads = [c / c.mean() for c in counts.values()] or [torch.ones(1)]
    return {**sums, "lr": lr, "grad_norm": float(grad_norm),
            "imbalance": sum(float(l.max()) for l in loads) / len(loads), "min_load": min(float(l.min()) for l in loads)}


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms, biases and embeddings (1-D tensors or embedding tables)."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or id(param) in embeddings else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def write_log(out_dir: Path, log: dict[str, Any]) -> Path:
    """The JSON learning curve, written atomically to ``out_dir/train_log.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_json_atomically(out_dir / "train_log.json", log)


class _StopFlag:
    """Ctrl-C asks the loop to stop at the next step boundary and checkpoint there."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopFlag:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, *_: object) -> None:
        if self.requested:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
