"""`moekit train`: train an MoE causal LM from scratch, or continue from a checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from moekit.cli.app import app
from moekit.errors import INTERRUPTED
from moekit.cli._common import Threads, err_console, print_json, say, user_errors
from moekit.cli._options import SEED_MAX, real


@app.command()
def train(
    arch: str = typer.Option("qwen3_moe", help="Family name (qwen3_moe, mixtral, olmoe, deepseek_v3, glm4_moe, "
                             "qwen3), reference preset (ref-fine, ref-coarse, ref-dense), or a YAML/JSON model config file."),
    init: Path = typer.Option(None, help="Continue training this model (an HF model folder or a shipped name such "
                              "as moekit/ref-fine) instead of starting from scratch."),
    data: str = typer.Option("stdlib", help="Corpus: 'stdlib', file, directory, glob, or 'hf:NAME[:SPLIT]'."),
    eval_data: str = typer.Option(None, help="Evaluation corpus (default: stdlib:eval for stdlib)."),
    text_field: str = typer.Option("text", help="Text field of .jsonl/.parquet/hub rows."),
    tokenizer: Path = typer.Option(None, help="Tokenizer folder or model name (default: the --init model's, else "
                                   "train one)."),
    vocab_size: int = typer.Option(8192, min=259, help="Vocabulary of a newly trained tokenizer (a byte-level BPE: "
                                   "at least 259)."),
    seq_len: int = typer.Option(256, min=2, help="Tokens per training sequence."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder (rerun to resume)."),
    steps: int = typer.Option(200, min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(8, min=1, help="Sequences per micro-batch."),
    grad_accum: int = typer.Option(1, min=1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(None, parser=real(0, above=True), help="Peak learning rate (AdamW); default 2e-3 "
                             "from scratch, 1e-4 with --init (a trained model: higher rates made upcycled and "
                             "combined models worse in benchmarks/build.py and combine.py)."),
    warmup: int = typer.Option(20, min=0, help="Linear warmup steps, then cosine decay."),
    aux_loss_coef: float = typer.Option(0.01, parser=real(0), help="Weight of the load-balancing loss."),
    z_loss_coef: float = typer.Option(1e-3, parser=real(0), help="Weight of the router z-loss."),
    bias_update_rate: float = typer.Option(None, parser=real(0), help="Aux-loss-free bias step γ (default 1e-3 "
                                           "where routers have a correction bias, else 0)."),
    checkpoint_every: int = typer.Option(100, min=1, help="Steps between checkpoints."),
    eval_every: int = typer.Option(100, min=1, help="Steps between evaluations."),
    seed: int = typer.Option(0, min=0, max=SEED_MAX, help="Seed of weights and data order."),
    train_only: str = typer.Option("all", help="What learns: all; routers (every other weight frozen: the "
                                   "cheap healing step after `moekit combine` or `moekit upcycle`); or mlp (each "
                                   "layer's MLP sublayer: branches that `moekit combine` merges without loss)."),
    threads: Threads = None,
    dtype: str = typer.Option("auto", help="What the saved model stores: auto (the --init checkpoint's dtype, "
                              "float32 from scratch), bfloat16, float16, float32. Training is fp32."),
    as_json: bool = typer.Option(False, "--json", is_eager=True, help="Print the result as JSON."),
) -> None:
    """Train an MoE causal LM on a corpus, with explicit router losses and exact resume."""
    from moekit.train.run import run_training  # torch and transformers: not for --help

    with user_errors():
        result = run_training(
            arch=arch, init=init, data=data, eval_data=eval_data, text_field=text_field, tokenizer=tokenizer,
            vocab_size=vocab_size, seq_len=seq_len, out=out, steps=steps, batch_size=batch_size,
            grad_accum=grad_accum, lr=lr, warmup=warmup, aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef,
            bias_update_rate=bias_update_rate, checkpoint_every=checkpoint_every, eval_every=eval_every,
            seed=seed, train_only=train_only, dtype=dtype, show_progress=not as_json, console=err_console,
        )
    if as_json:
        print_json(result)
    elif result["interrupted"]:
        say(f"at step {result['steps']}; checkpoint saved in {out}. Rerun the same command to resume.",
            label="[yellow]interrupted[/]")
    elif result["already_finished"]:  # no step ran: this session measured nothing
        say(f"already finished at step {result['steps']}; model in {result['model_dir']} (raise --steps to train "
            "further).")
    else:
        say(f"model in {result['model_dir']}: train loss {result['train_loss']:.4f}"
            + (f", eval ppl {result['eval_perplexity']:.2f}" if result.get("eval_perplexity") else "")
            + f", {result['tokens_per_s']:.0f} tok/s", label="[bold green]done[/]")
    if result["interrupted"]:  # checkpointed, but not done: scripts must not read it as success
        raise typer.Exit(INTERRUPTED)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
