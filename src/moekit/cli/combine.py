"""`moekit combine DENSE_A DENSE_B ... -o OUT`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from moekit.cli.app import app
from moekit.cli._build import JsonOut, Out, Seed, TopK
from moekit.cli._common import Threads, print_json, say, user_errors


@app.command("combine")
def combine_command(
    denses: Annotated[list[str], typer.Argument(help="Two or more dense checkpoint folders (one architecture and "
                                                     "tokenizer).")],
    out: Out,
    top_k: TopK = 1,
    shared: Annotated[str, typer.Option(help="average | first: attention, norms, embeddings and head.")] = "average",
    router: Annotated[str, typer.Option(help="hidden (each model's mean MLP input on its --data) | random.")] = "hidden",
    data: Annotated[Optional[list[str]], typer.Option(help="One corpus per model, in order, for the hidden router "
                                                           "(default: the shipped calibration split).")] = None,
    samples: Annotated[int, typer.Option(min=1, help="Sequences per model for the hidden router.")] = 8,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per sequence.")] = 256,
    seed: Seed = 0,
    threads: Threads = None,
    json_out: JsonOut = False,
) -> None:
    """Combine dense models into one MoE, each model's MLP an expert (Branch-Train-MiX,
    mergekit-moe). Train the routers after with `moekit train --init OUT`."""
    from moekit.build.combine import combine
    from moekit.errors import MoekitError

    with user_errors():
        if shared not in ("average", "first") or router not in ("hidden", "random"):
            raise MoekitError(f"--shared is average or first (got {shared!r}); --router is hidden or random "
                              f"(got {router!r}).")
        report = combine(denses, out_dir=out, top_k=top_k, shared=shared, router=router, data=data,
                         n_samples=samples, seq_len=seq_len, seed=seed)
    if json_out:
        print_json(report)
        return
    say(f"{', '.join(report['models'])} → {report['out']}: {report['family']}, {report['experts']} experts, "
        f"top-{top_k}, shared weights {shared}, router {router}")
