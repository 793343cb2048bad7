"""`moekit compress [MODEL] --recipe FILE|PRESET -o OUT`: a smaller checkpoint and a report."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from moekit.cli.app import app
from moekit.cli._common import Threads, console, note, print_json, say, user_errors
from moekit.cli._options import SEED_MAX, within_positions
from moekit.cli._streaming import DEFAULT_ACTIVATION_BUDGET, ActivationBudget, ComputeDtype, Device, size_option


@app.command("compress")
def compress_command(
    model: Annotated[Optional[str], typer.Argument(help="Checkpoint folder, hub id, or shipped reference.")] = None,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Preset name or recipe YAML file.")] = "prune-50",
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="New folder for the result.")] = None,
    data: Annotated[str, typer.Option(help="Calibration corpus.")] = "stdlib:calib",
    samples: Annotated[int, typer.Option(min=1, help="Calibration sequences.")] = 64,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per calibration sequence.")] = 256,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed for calibration data and random steps.")] = 0,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer folder or model name (default: the model's).")] = None,
    text_field: Annotated[str, typer.Option(help="Text field of .jsonl/.parquet/hub rows.")] = "text",
    eval_: Annotated[bool, typer.Option("--eval", help="Evaluate before and after.")] = False,
    dtype: Annotated[str, typer.Option(help="Output dtype: auto (the source checkpoint's), bfloat16, float16, "
                                            "float32.")] = "auto",
    list_presets: Annotated[bool, typer.Option("--list-presets", is_eager=True,
                                               help="List the preset recipes and exit.")] = False,
    plan_only: Annotated[bool, typer.Option("--plan", is_eager=True, help="Show the sizes the recipe will give, from the "
                                            "config alone (no weights read, nothing written), and exit.")] = False,
    device: Device = "auto",
    compute_dtype: ComputeDtype = "auto",
    activation_budget: ActivationBudget = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run an interruption left in the hidden work "
                                                          "folder next to --out (starts afresh if there is none).")] = False,
    stats: Annotated[Optional[str], typer.Option(
        "--stats", metavar="FOLDER", help="Statistics folder `moekit calibrate` wrote for this model and data: used "
                                          "instead of calibrating.")] = None,
    max_shard_size: Annotated[str, typer.Option(parser=size_option, metavar="SIZE", help="An output up to this size is one "
                                                "model.safetensors; a bigger one, one shard per decoder layer.")] = "5GB",
    materialize: Annotated[bool, typer.Option("--materialize", help="decompose steps multiply their factors back: "
                                              "a standard checkpoint (original size) that loads anywhere.")] = False,
    dequantize: Annotated[bool, typer.Option("--dequantize", help="Accept a quantized (compressed-tensors) MODEL, "
                                             "read dequantized: the output stores floats unless the recipe quantizes "
                                             "again (refused without this flag).")] = False,
    threads: Threads = None,
    json_out: Annotated[bool, typer.Option("--json", is_eager=True, help="Print the report as JSON.")] = False,
) -> None:
    """Compress an MoE with a recipe; the output loads in plain transformers."""
    from moekit.recipe import presets

    if list_presets:
        for name, path in presets().items():
            first = path.read_text().splitlines()[0].lstrip("# ")
            say(first, label=f"[bold]{name}[/]:")
        return
    from moekit.compression import compress
    from moekit.errors import MoekitError
    from moekit.io.load import check_model
    from moekit.planning import plan

    with user_errors():
        check_model(model)
        name, recipe = recipe, _materialized(recipe) if materialize else recipe
        if plan_only:
            report = plan(model, recipe, dtype=dtype, dequantize=dequantize)
            if json_out:
                print_json(report)
                return
            table = _size_table(f"{report['model']}: what {name} will give (planned, no weights read)", report)
            table.add_row("experts per MoE layer", _counts(report["before"]), _counts(report["after"]))
            for q in report["after"].get("quantization", []):
                group = f"groups of {q['group_size']}" if q["group_size"] else "one scale per channel"
                table.add_row("quantized weights", f"{q['bytes_before']:,} bytes",
                              f"{q['bytes_after']:,} bytes: {q['bits']} bits"
                              + (f" (experts {q['expert_bits']})" if q["expert_bits"] != q["bits"] else "")
                              + f", {group}, {q['average_bits']:.2f} bits/weight with scales")
            console.print(table)
            for line in report["notes"]:
                note(line)
            return
        if out is None:
            raise MoekitError("give an output folder with -o/--out (a new folder), or --plan to see sizes only.")
        within_positions(model, "--seq-len", seq_len)
        report = compress(model, recipe, out_dir=out, data=data, n_samples=samples, seq_len=seq_len, seed=seed,
                          tokenizer=tokenizer, text_field=text_field, evaluate=eval_, dtype=dtype, progress=not json_out,
                          device=device, compute_dtype=compute_dtype,
                          activation_budget=activation_budget or DEFAULT_ACTIVATION_BUDGET, resume=resume, stats=stats,
                          max_shard_size=max_shard_size, dequantize=dequantize,
                          on_start=None if json_out else _announce)
        if report.get("rank"):  # under torchrun, another rank than 0: rank 0 reports
            return
        if json_out:
            print_json(report)
            return
        from moekit.io.card import eval_tokens

        before, after = report["before"], report["after"]
        table = _size_table(f"{report['model']} → {report['out']}", report)
        if "eval" in before:
            table.add_row(f"perplexity ({eval_tokens(before['eval'])})", f"{before['eval']['perplexity']:.3f}",
                          f"{after['eval']['perplexity']:.3f}")
            table.add_row("accuracy", f"{before['eval']['accuracy']:.2%}", f"{after['eval']['accuracy']:.2%}")
        console.print(table)
        for step in report["steps"]:  # what the fewer-calls steps chose, and why
            if "scores" in step:
                scores = ", ".join(f"{i}: {v:.4g}" for i, v in step["scores"].items())
                say(f"{step['type']}: dropped layers {step['dropped']} (lowest {step['criterion']} score; per layer "
                    f"{scores})")
            elif step["type"] in ("drop_blocks", "drop_layers"):
                say(f"{step['type']}: dropped layers {step['dropped']}")
            elif step["type"] == "topk":
                say(f"topk: top-k per MoE layer {step['top_k']}")
            elif "allocation" in step and step["allocation"]["proven_optimal"]:  # unproven: a note below
                say(f"quantize: experts' bits proven within {step['allocation']['within']:.2%} of the least total "
                    f"error ({step['allocation']['solve_seconds']:.1f} s)")
        for line in report["notes"]:
            note(line)
        from moekit.io.card import who_loads

        say(who_loads(report), style="dim" if report["plain_transformers"] == "same" else "yellow")
        console.print(f"done in {report['seconds']:.1f}s, peak memory {report['peak_memory_mib']:.0f} MiB")


def _announce(work) -> None:
    """The first lines of a long run say where its resumable state is."""
    verb = "resuming from" if work.resumed else "work folder (finished layers; rerun with --resume after an interruption):"
    say(f"{verb} {work.path}", style="dim")


def _size_table(title: str, report: dict) -> Table:
    """Parameters, active parameters per token and bytes, before and after."""
    from moekit.io.card import stored_as
    before, after = report["before"], report["after"]
    table = Table(title=Text(title), title_justify="left")  # model names and paths are not markup
    for column in ("", "before", "after"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("parameters", f"{before['total_params']:,}", f"{after['total_params']:,}")
    from moekit.io.card import active_after, experts_per_token_after

    table.add_row("active / token", f"{before['active_params']:,}", active_after(after))
    table.add_row("experts / token", f"{before['experts_per_token']:g}", experts_per_token_after(after))
    table.add_row(f"bytes stored (after: {stored_as(report)})", f"{before['bytes']:,}", f"{after['bytes']:,}")
    return table


def _counts(sizes: dict) -> str:
    counts = sorted(set(sizes["experts_per_layer"].values()))
    return ", ".join(map(str, counts)) if counts else "-"


def _materialized(recipe: str):
    from moekit.recipe import load_recipe
    from moekit.recipe.steps.decompose import materialized

    return materialized(load_recipe(recipe))
