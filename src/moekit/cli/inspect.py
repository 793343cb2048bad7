"""`moekit inspect [MODEL]`: family, layer table, parameters total and active, bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from moekit.cli.app import app
from moekit.cli._common import console, print_json, say, user_errors

if TYPE_CHECKING:
    from moekit.arch.summary import ModelSummary


def _fmt(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def render(summary: "ModelSummary", name: str) -> None:
    if not any(layer.kind == "moe" for layer in summary.layers):
        _render_dense(summary, name)
        return
    table = Table(title=Text(f"{name} — {summary.model_class} ({summary.family})"), title_justify="left")
    for column in ("layer", "kind", "experts", "top-k", "expert I", "shared I", "scoring", "routed params"):
        table.add_column(column, justify="right" if column not in ("kind", "scoring") else "left")
    for layer in summary.layers:
        if layer.kind != "moe":
            table.add_row(str(layer.index), layer.kind, "", "", "", "", "", "", style="dim")
            continue
        table.add_row(
            str(layer.index), "moe", str(layer.num_experts), str(layer.top_k),
            str(layer.expert_intermediate_size), str(layer.shared_intermediate_size or "-"),
            layer.scoring, _fmt(layer.routed_params),
        )
    console.print(table)
    factored = [layer for layer in summary.layers if layer.factored]
    if factored:
        ranks = "; ".join(f"{layer.index}: {layer.factored['mean_rank_gate_up']:g} / {layer.factored['mean_rank_down']:g}"
                          + (" + shared base" if layer.factored["shared_base"] else "") for layer in factored)
        console.print(f"experts stored as low-rank factors (moekit's format; parameters below are the factors'), "
                      f"mean rank gate/up / down per layer: {ranks}")
    console.print(
        f"parameters: [bold]{_fmt(summary.total_params)}[/] total, [bold]{_fmt(summary.active_params)}[/] "
        f"active per token; routed experts are [bold]{summary.routed_share:.1%}[/] of the model"
    )
    _render_bytes(summary)


def _render_dense(summary: "ModelSummary", name: str) -> None:
    """A model with no routed experts: what it is, and which commands make an MoE of it."""
    from moekit.build.upcycle import TARGETS

    say(f"{name} — {summary.model_class} ({summary.family}): {len(summary.layers)} decoder layers, every one dense")
    console.print(f"parameters: [bold]{_fmt(summary.total_params)}[/], all of them active per token")
    _render_bytes(summary)
    say("no routed experts: a dense model"
        + ("; `moekit upcycle` or `moekit split` builds an MoE from it." if summary.family in TARGETS else "."))


def _render_bytes(summary: "ModelSummary") -> None:
    by_dtype = ", ".join(f"{dtype} {_fmt(n)}B" for dtype, n in summary.bytes_by_dtype.items())
    console.print(f"bytes stored: {_fmt(summary.total_bytes)}B ({by_dtype})")


@app.command("inspect")
def inspect_command(
    model: Annotated[Optional[str], typer.Argument(help="Checkpoint folder, hub id, or shipped reference.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Run the checkpoint's own code.")] = False,
) -> None:
    """Show a model's structure: which layers are routed, experts, top-k, sizes (a dense
    model too: its layers and parameters)."""
    from moekit.arch.summary import summarize
    from moekit.io.checkpoint import Checkpoint
    from moekit.io.load import default_model, load, resolve_folder, stored_dtype

    with user_errors():
        name = model or default_model()
        summary = summarize(load(name, trust_remote_code=trust_remote_code), stored_dtype=stored_dtype(name))
        folder = resolve_folder(name)
        if folder is not None:  # as the files store them: a quantized checkpoint's packed bytes, not its floats
            summary.bytes_by_dtype = Checkpoint(folder).stored_bytes_by_dtype
        if json_out:
            print_json({"model": name, **summary.to_dict()})
        else:
            render(summary, name)
