"""`moekit eval [MODEL ...]`: perplexity, accuracy and routing, models side by side."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from moekit.cli import app
from moekit.cli._common import console, print_json, user_errors


@app.command("eval")
def eval_command(
    models: Annotated[Optional[list[str]], typer.Argument(help="Models to compare (default: the reference).")] = None,
    data: Annotated[str, typer.Option(help="Corpus: stdlib:eval, files, a folder, a glob, hf:NAME.")] = "stdlib:eval",
    context_length: Annotated[int, typer.Option(help="Tokens per window.")] = 256,
    stride: Annotated[int, typer.Option(help="New tokens scored per window (< context length).")] = 128,
    max_tokens: Annotated[Optional[int], typer.Option(help="Evaluate only the first N tokens.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward.")] = 8,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer folder (default: each model's).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Evaluate one or more models on the same tokens."""
    from moekit.data.tokens import evaluation_stream, tokenizer_for
    from moekit.eval.perplexity import evaluate
    from moekit.io.load import default_model, load

    with user_errors():
        names = models or [default_model()]
        # Every model is scored on the first model's tokenization, so the numbers compare.
        stream = evaluation_stream(data, tokenizer_for(names[0], tokenizer)).input_ids
        if max_tokens is not None:
            stream = stream[:max_tokens]
        results = {
            name: evaluate(load(name), stream, context_length=context_length, stride=stride,
                           batch_size=batch_size, progress=not json_out)
            for name in names
        }
        if json_out:
            print_json({"data": data, "models": {n: r.to_dict() for n, r in results.items()}})
            return
        table = Table(title=f"evaluation on {data} ({next(iter(results.values())).tokens} tokens)", title_justify="left")
        table.add_column("metric")
        for name in names:
            table.add_column(name, justify="right")
        table.add_row("perplexity", *[f"{r.perplexity:.3f}" for r in results.values()])
        table.add_row("next-token accuracy", *[f"{r.accuracy:.2%}" for r in results.values()])
        depth = max(len(r.layers) for r in results.values())
        for i in range(depth):
            cells = [r.layers[i] if i < len(r.layers) else None for r in results.values()]
            index = next(c.index for c in cells if c is not None)
            table.add_row(f"layer {index} entropy / log E",
                          *["" if c is None else f"{c.entropy_normalized:.3f}" for c in cells], style="dim")
            table.add_row(f"layer {index} load max/mean",
                          *["" if c is None else f"{c.load_imbalance:.2f}" for c in cells], style="dim")
        console.print(table)
