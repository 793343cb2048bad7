"""`moekit eval [MODEL ...]`: perplexity, accuracy and routing, models side by side,
plus lm-evaluation-harness tasks with ``--tasks``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from moekit.cli.app import app
from moekit.cli._common import Threads, console, print_json, user_errors
from moekit.cli._options import within_positions
from moekit.cli._streaming import ActivationBudget, ComputeDtype, Device, budget, open_streamed


@app.command("eval")
def eval_command(
    models: Annotated[Optional[list[str]], typer.Argument(help="Models to compare (default: the reference).")] = None,
    data: Annotated[str, typer.Option(help="Corpus: stdlib:eval, files, a folder, a glob, hf:NAME.")] = "stdlib:eval",
    context_length: Annotated[int, typer.Option(min=2, help="Tokens per window.")] = 256,
    stride: Annotated[int, typer.Option(min=1, help="New tokens scored per window (< context length).")] = 128,
    max_tokens: Annotated[Optional[int], typer.Option(min=2, help="Score at most N tokens (at least one window), in "
                                                      "windows spread evenly over the whole data: a quicker "
                                                      "estimate of the whole.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per forward.")] = 8,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer folder or model name (default: each model's).")] = None,
    text_field: Annotated[str, typer.Option(help="Text field of .jsonl/.parquet/hub rows.")] = "text",
    tasks: Annotated[Optional[str], typer.Option(
        help="lm-eval tasks, comma-separated (offline; shipped: moekit_stdlib_nexttoken; needs the lmeval extra).",
    )] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Score only the first N items of each task.")] = None,
    task_path: Annotated[Optional[list[str]], typer.Option(
        help="Folder of your own lm-eval task YAMLs with local data (repeatable).",
    )] = None,
    speed: Annotated[bool, typer.Option("--speed", help="Also time generation: prefill, then decode with a KV cache "
                                        "(tokens/s, median of runs; the model in memory).")] = False,
    speed_prefill: Annotated[int, typer.Option(min=1, help="--speed: prompt tokens.")] = 512,
    speed_decode: Annotated[int, typer.Option(min=1, help="--speed: generated tokens.")] = 128,
    speed_runs: Annotated[int, typer.Option(min=1, help="--speed: timed runs (median reported).")] = 5,
    device: Device = "auto",
    compute_dtype: ComputeDtype = "auto",
    activation_budget: ActivationBudget = None,
    threads: Threads = None,
    json_out: Annotated[bool, typer.Option("--json", is_eager=True, help="Print JSON for scripts.")] = False,
) -> None:
    """Evaluate one or more models on the same tokens."""
    from moekit.data.tokens import evaluation_stream
    from moekit.io.tokenizer import tokenizer_for
    from moekit.errors import MoekitError
    from moekit.eval.perplexity import evaluate
    from moekit.io.load import check_model, default_model, load
    from moekit.progress import phase

    with user_errors():
        names = list(dict.fromkeys(models or [default_model()]))  # a model named twice is scored once
        for name in names:
            check_model(name)
        if stride >= context_length:
            raise MoekitError(f"--stride {stride} must be below --context-length {context_length}, so that each "
                              "window keeps left context.")
        from moekit.distributed import current

        if current() is not None and (tasks is not None or speed):  # they run the whole model on every rank
            raise MoekitError("--tasks and --speed do not share their work across ranks; run them without torchrun "
                              "(perplexity and accuracy do).")
        for name in names:
            within_positions(name, "--context-length", context_length)
            if speed:
                within_positions(name, "--speed-prefill + --speed-decode", speed_prefill + speed_decode)
        if tasks is None and (limit is not None or task_path):
            raise MoekitError("--limit and --task-path apply to lm-eval tasks; add --tasks NAME[,NAME].")
        harness, tokenizers = None, {}
        if tasks is not None:
            from moekit.eval.harness import load_tasks, run_tasks

            # Find the tasks and every model's tokenizer before any model is scored.
            with phase(f"finding lm-eval tasks {tasks}", enabled=not json_out):
                harness = load_tasks(tasks, task_paths=task_path or ())
            tokenizers = {name: tokenizer_for(name, tokenizer) for name in names}
        # Every model is scored on the first model's tokenization, so the numbers compare.
        first_tokenizer = tokenizer_for(names[0], tokenizer)
        with phase(f"tokenizing {data}", enabled=not json_out):
            stream = evaluation_stream(data, first_tokenizer, text_field=text_field).input_ids
        _check_all_before_scoring(names, stream, first_tokenizer, forced_tokenizer=tokenizer is not None,
                                  context_length=context_length, stride=stride)
        results, task_results, speeds = {}, {}, {}
        for name in names:
            spill = budget(activation_budget)
            results[name] = evaluate(open_streamed(name, device, compute_dtype), stream,
                                     context_length=context_length, stride=stride, batch_size=batch_size,
                                     max_tokens=max_tokens, progress=not json_out, activations=spill)
            spill.close()
            if harness is not None:  # lm-eval runs the whole model's forward: it needs the model in memory
                model = load(name)
                task_results[name] = run_tasks(model, tokenizers[name], harness, limit=limit, batch_size=batch_size,
                                               progress=not json_out)
                del model
            if speed:  # generation with a cache runs the whole model: in memory too
                from moekit.eval.speed import measure_speed

                with phase(f"timing generation: {speed_runs} runs of {speed_prefill} + {speed_decode} tokens",
                           enabled=not json_out):
                    speeds[name] = measure_speed(load(name), prefill=speed_prefill, decode=speed_decode,
                                                 runs=speed_runs)
        if json_out:
            payload = {"data": data, "models": {n: r.to_dict() for n, r in results.items()}}
            for name, timing in speeds.items():
                payload["models"][name]["speed"] = timing.to_dict()
            if harness is not None:
                for name, result in task_results.items():
                    payload["models"][name]["tasks"] = result.tasks
                first = next(iter(task_results.values()))
                payload["tasks"] = {"names": harness.names, "limit": limit, "samples": first.samples}
            print_json(payload)
            return
        # corpus and model names as given, not read as markup
        table = Table(title=Text(f"evaluation on {data} ({next(iter(results.values())).tokens} tokens)"),
                      title_justify="left")
        table.add_column("metric")
        for name in names:
            table.add_column(Text(name), justify="right")
        table.add_row("perplexity", *[f"{r.perplexity:.3f}" for r in results.values()])
        table.add_row("next-token accuracy", *[f"{r.accuracy:.2%}" for r in results.values()])
        if any(r.experts_per_token is not None for r in results.values()):
            table.add_row("experts per token (mean over layers)", *["-" if r.experts_per_token is None
                                                                     else f"{r.experts_per_token:.3f}"
                                                                     for r in results.values()])
        for label, cells in _task_rows([task_results[name].tasks for name in task_results]):
            table.add_row(label, *cells)
        if speeds:
            timing = next(iter(speeds.values()))
            table.add_row(f"prefill tokens/s ({speed_prefill} tokens)", *[f"{speeds[n].prefill_tokens_per_s:,.0f}"
                                                                          for n in names])
            table.add_row(f"decode tokens/s ({speed_decode} tokens, KV cache)",
                          *[f"{speeds[n].decode_tokens_per_s:,.1f}" for n in names])
            console.print(f"speed: median of {speed_runs} runs, {timing.threads} threads, {timing.device}, "
                          f"{timing.machine['cpu']}", style="dim")
        depth = max(len(r.layers) for r in results.values())
        for i in range(depth):
            cells = [r.layers[i] if i < len(r.layers) else None for r in results.values()]
            index = next(c.index for c in cells if c is not None)
            table.add_row(f"layer {index} entropy / log E",
                          *["" if c is None else f"{c.entropy_normalized:.3f}" for c in cells], style="dim")
            table.add_row(f"layer {index} load max/mean",
                          *["" if c is None else f"{c.load_imbalance:.2f}" for c in cells], style="dim")
            table.add_row(f"layer {index} experts per token",
                          *["" if c is None else f"{c.experts_per_token:.3f}" for c in cells], style="dim")
        console.print(table)
        if harness is not None:
            samples = next(iter(task_results.values())).samples
            console.print("lm-eval items scored: " + ", ".join(f"{t} {n}" for t, n in samples.items()), style="dim")


def _check_all_before_scoring(names: list[str], stream, first_tokenizer, *, forced_tokenizer: bool,
                              context_length: int, stride: int) -> None:
    """Refuse, before the first model is scored, any model that could not be scored on
    ``stream`` or whose own tokenizer differs from the first model's (its perplexity on
    another tokenization would not compare)."""
    from moekit.io.tokenizer import tokenizer_for
    from moekit.errors import MoekitError
    from moekit.eval.perplexity import check_scoring
    from moekit.io.load import load_config

    for name in names:
        try:
            check_scoring(load_config(name), stream, context_length=context_length, stride=stride)
        except MoekitError as exc:
            raise MoekitError(f"{name}: {exc}") from None
        if forced_tokenizer or name == names[0]:
            continue
        try:
            own = tokenizer_for(name)
        except MoekitError:
            continue  # a folder saved without a tokenizer: the vocabulary check above is all we can do
        if own.get_vocab() != first_tokenizer.get_vocab():
            raise MoekitError(
                f"{name} uses a different tokenizer from {names[0]}, so their perplexities on one tokenization "
                "would not compare; evaluate them in separate runs (or pass --tokenizer to force one)."
            )


def _task_rows(per_model: list[dict[str, dict[str, float | None]]]) -> list[tuple[str, list[str]]]:
    """One row per (task, metric), models side by side; a metric's stderr shares its cell."""
    rows = []
    for task in dict.fromkeys(t for metrics in per_model for t in metrics):
        names = dict.fromkeys(m for metrics in per_model for m in metrics.get(task, {}) if not m.endswith("_stderr")
                              and "_stderr/" not in m)
        for metric in names:
            cells = []
            for metrics in per_model:
                value = metrics.get(task, {}).get(metric)
                stderr = metrics.get(task, {}).get(metric.replace("/", "_stderr/", 1) if "/" in metric
                                                   else f"{metric}_stderr")
                cells.append("" if value is None else f"{value:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}"))
            rows.append((f"{task} {metric}", cells))
    return rows
