"""`moekit calibrate [MODEL] -o STATS/`: per-expert statistics, one layer at a time."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from moekit.cli.app import app
from moekit.cli._common import Threads, err_console, note, print_json, say, user_errors
from moekit.cli._options import SEED_MAX, within_positions
from moekit.cli._streaming import ActivationBudget, ComputeDtype, Device, budget, open_streamed


def _list_statistics(value: bool) -> None:
    """--list-stats: before the other options are checked (it needs no -o)."""
    if value:
        from moekit.calib.observers import STATISTICS

        for name, what in STATISTICS.items():
            say(what, label=f"[bold]{name}[/]:")
        raise typer.Exit()


@app.command("calibrate")
def calibrate_command(
    out: Annotated[str, typer.Option("--out", "-o", help="New folder for the statistics.")],
    model: Annotated[Optional[str], typer.Argument(help="Checkpoint folder, hub id, or shipped reference.")] = None,
    data: Annotated[str, typer.Option(help="Corpus: stdlib:calib, files, a folder, a glob, hf:NAME.")] = "stdlib:calib",
    samples: Annotated[int, typer.Option(min=1, help="Calibration sequences.")] = 64,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per sequence.")] = 256,
    statistics: Annotated[str, typer.Option(
        metavar="NAMES", help="Comma-separated statistics to collect (see --list-stats).",
    )] = "frequency,soft_frequency,reap,ean,man,msan,peak,coactivation,logit_similarity",
    old_statistics: Annotated[Optional[str], typer.Option(
        "--stats", hidden=True, help="The old name of --statistics (--stats is a folder in compress and run).",
    )] = None,
    hidden_sample: Annotated[int, typer.Option(min=0, help="Input hidden states kept per layer (adds hidden_sample).")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward.")] = 8,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed for choosing sequences and sampling states.")] = 0,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer folder or model name (default: the model's).")] = None,
    text_field: Annotated[str, typer.Option(help="Text field of .jsonl/.parquet/hub rows.")] = "text",
    list_stats: Annotated[bool, typer.Option("--list-stats", is_eager=True, callback=_list_statistics,
                                             help="List the statistics and exit.")] = False,
    device: Device = "auto",
    compute_dtype: ComputeDtype = "auto",
    activation_budget: ActivationBudget = None,
    threads: Threads = None,
    json_out: Annotated[bool, typer.Option("--json", is_eager=True, help="Print JSON for scripts.")] = False,
) -> None:
    """Collect the statistics compression methods read, and save them for reuse.

    The model streams from its checkpoint one decoder layer at a time."""
    from moekit.calib.calibrate import calibrate, check_statistics
    from moekit.data.tokens import calibration_tokens
    from moekit.io.tokenizer import tokenizer_for
    from moekit.io.load import check_model, default_model
    from moekit.io.outputs import check_output
    from moekit.progress import phase

    if old_statistics is not None:  # still works, for the scripts written before it was renamed
        note("calibrate's --stats is now --statistics (--stats names a statistics folder in compress and run); "
             "the old name will go in a later version.", to=err_console)
        statistics = old_statistics
    with user_errors():
        name = model or default_model()
        check_model(name)
        check_output(out)  # before any data is read or weight loaded
        within_positions(name, "--seq-len", seq_len)
        wanted = [s.strip() for s in statistics.split(",") if s.strip()] + (["hidden_sample"] if hidden_sample else [])
        check_statistics(wanted, hidden_sample or 0)
        with phase(f"tokenizing {data}", enabled=not json_out):
            tokens = calibration_tokens(data, tokenizer_for(name, tokenizer), n_samples=samples, seq_len=seq_len,
                                        seed=seed, text_field=text_field)
        spill = budget(activation_budget)
        result = calibrate(
            open_streamed(name, device, compute_dtype), tokens.input_ids, activations=spill, statistics=wanted, batch_size=batch_size, hidden_sample=hidden_sample,
            seed=seed, progress=not json_out, meta={"model_name": name, **tokens.describe()},
        )
        spill.close()
        from moekit.distributed import current

        if (world := current()) is not None and not world.main:
            return  # under torchrun every rank holds the combined statistics; rank 0 writes them
        folder = result.save(out)
        summary = {"out": str(folder), "layers": len(result.layers), "tokens": next(iter(result.tokens.values())),
                   "statistics": result.statistics, "seconds": result.meta["seconds"],
                   "data_fingerprint": result.meta["data_fingerprint"]}
        if json_out:
            print_json(summary)
        else:
            say(f"wrote {summary['statistics']} for {summary['layers']} MoE layers ({summary['tokens']} tokens, "
                f"{summary['seconds']:.1f}s) to {folder}")
