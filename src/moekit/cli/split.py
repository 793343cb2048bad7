"""`moekit split DENSE -o OUT --experts E --top-k k --by random|cluster`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from moekit.cli.app import app
from moekit.cli._build import Dense, JsonOut, Out, Seed, TopK
from moekit.cli._common import Threads, console, print_json, say, user_errors


@app.command("split")
def split_command(
    dense: Dense,
    out: Out,
    experts: Annotated[int, typer.Option("--experts", min=1, help="Experts per layer (divides the MLP width).")] = 8,
    top_k: TopK = 2,
    by: Annotated[str, typer.Option(help="random | cluster (balanced k-means on the neurons' weights) | "
                                         "coactivation (on which neurons fire together).")] = "cluster",
    data: Annotated[str, typer.Option(help="Calibration corpus for the routers.")] = "stdlib:calib",
    samples: Annotated[int, typer.Option(min=1, help="Calibration sequences.")] = 16,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per calibration sequence.")] = 256,
    seed: Seed = 0,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer folder or model (default: the model's).")] = None,
    threads: Threads = None,
    json_out: JsonOut = False,
) -> None:
    """Split each dense MLP's neurons into experts (MoEfication, LLaMA-MoE), with routers
    fitted on calibration data; reports per layer the share of the MLP's output the top-k
    experts reproduce on held-out tokens. Continue training with `moekit train --init OUT`."""
    from moekit.build.split import split
    from moekit.errors import MoekitError

    with user_errors():
        if by not in ("random", "cluster", "coactivation"):
            raise MoekitError(f"--by {by!r} is not one of random, cluster, coactivation.")
        report = split(dense, out_dir=out, experts=experts, top_k=top_k, by=by, data=data, n_samples=samples,
                       seq_len=seq_len, seed=seed, tokenizer=tokenizer)
    if json_out:
        print_json(report)
        return
    say(f"{report['dense']} → {report['out']}: {report['family']}, {experts} experts of width "
        f"{report['expert_width']}, top-{top_k}, split by {by}")
    for layer, shares in report["layers"].items():
        console.print(f"layer {layer}: top-{top_k} reproduce {shares['reproduced_share']:.1%} of the MLP's output on "
                      f"held-out tokens (an oracle choice: {shares['oracle_share']:.1%})", highlight=False)
