"""`moekit upcycle DENSE -o OUT --experts E --top-k k --method copy|virtual-groups|drop`."""

from __future__ import annotations

from typing import Annotated

import typer

from moekit.cli.app import app
from moekit.cli._build import Dense, JsonOut, Out, Seed, TopK
from moekit.cli._common import Threads, console, print_json, say, user_errors


@app.command("upcycle")
def upcycle_command(
    dense: Dense,
    out: Out,
    experts: Annotated[int, typer.Option("--experts", min=1, help="Routed experts per layer.")] = 8,
    top_k: TopK = 2,
    method: Annotated[str, typer.Option(help="copy | virtual-groups | drop.")] = "copy",
    groups: Annotated[int, typer.Option(min=1, help="virtual-groups: shards of the MLP (divides its width, "
                                                    "--experts and --top-k).")] = 1,
    drop_ratio: Annotated[float, typer.Option(help="drop: share of each expert's neurons re-initialised.")] = 0.5,
    family: Annotated[str, typer.Option(help="The MoE family written: qwen3_moe or glm4_moe for Qwen3 (glm4_moe: "
                                             "DeepSeek-V3-style, with a shared expert), mixtral for Llama and "
                                             "Mistral. Default: the first.")] = None,
    shared_fraction: Annotated[float, typer.Option(help="glm4_moe: the shared expert's share of the dense MLP's "
                                                        "output at step 0.")] = 0.5,
    seed: Seed = 0,
    threads: Threads = None,
    json_out: JsonOut = False,
) -> None:
    """Turn a dense model into an MoE whose experts start from its MLPs (Sparse Upcycling;
    NVIDIA's virtual groups; Drop-Upcycling). copy and virtual-groups compute the dense
    model's logits at step 0; continue training with `moekit train --init OUT`."""
    from moekit.build.upcycle import upcycle
    from moekit.errors import MoekitError

    with user_errors():
        if method not in ("copy", "virtual-groups", "drop"):
            raise MoekitError(f"--method {method!r} is not one of copy, virtual-groups, drop.")
        report = upcycle(dense, out_dir=out, experts=experts, top_k=top_k, method=method, groups=groups,
                         drop_ratio=drop_ratio, family=family, shared_fraction=shared_fraction, seed=seed)
    if json_out:
        print_json(report)
        return
    say(f"{report['dense']} → {report['out']}: {report['family']}, {experts} experts of width "
        f"{report['expert_width']}, top-{top_k}, {method}"
        + (f", a shared expert of width {report['shared_expert_width']}" if "shared_fraction" in report else ""))
    if "max_abs_logit_difference" in report:
        console.print(f"step 0 against the dense model: max |Δ logit| {report['max_abs_logit_difference']:.2e} "
                      "on random tokens", highlight=False)
