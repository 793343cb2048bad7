"""`moekit analyze [MODEL [MODEL_B]] --data CORPUS[,CORPUS...] -o REPORT/`: what the routers
do, as report.html (figures embedded), one PNG per figure and analysis.json."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from moekit.cli.app import app
from moekit.cli._common import Threads, print_json, say, user_errors
from moekit.cli._options import SEED_MAX, within_positions
from moekit.cli._streaming import ActivationBudget, ComputeDtype, Device, budget, open_streamed


@app.command("analyze")
def analyze_command(
    out: Annotated[str, typer.Option("--out", "-o", help="New folder for the report.")],
    models: Annotated[Optional[list[str]], typer.Argument(
        help="One model, or two to compare on the same tokens (default: the reference).")] = None,
    data: Annotated[str, typer.Option(help="Comma-separated corpora (stdlib:eval, files, folders, globs); several "
                                           "give domain statistics.")] = "stdlib:eval",
    focus: Annotated[Optional[str], typer.Option(help="A corpus (one of --data, or added to them) to attribute: loss "
                                                      "increase when each top candidate expert is masked.")] = None,
    candidates: Annotated[int, typer.Option(min=1, help="Experts whose masked loss --focus measures.")] = 8,
    samples: Annotated[int, typer.Option(min=2, help="Rows per corpus (at most).")] = 64,
    seq_len: Annotated[int, typer.Option(min=2, help="Tokens per row.")] = 256,
    position_buckets: Annotated[int, typer.Option(min=1, help="Position buckets in a row.")] = 8,
    prefetch_tokens: Annotated[int, typer.Option(min=1, help="At most this many tokens, spread over all rows, score the one-step predictor.")] = 16384,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per forward.")] = 8,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed for choosing rows.")] = 0,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer folder or model name (default: the model's).")] = None,
    text_field: Annotated[str, typer.Option(help="Text field of .jsonl/.parquet rows.")] = "text",
    device: Device = "auto",
    compute_dtype: ComputeDtype = "auto",
    activation_budget: ActivationBudget = None,
    threads: Threads = None,
    json_out: Annotated[bool, typer.Option("--json", is_eager=True, help="Print JSON for scripts.")] = False,
) -> None:
    """Routing analysis: load, co-activation, cross-layer predictability, token, position and
    domain specialisation, expert attribution; with two models, side by side.

    The model streams from its checkpoint one decoder layer at a time."""
    from moekit.analyze import analyze
    from moekit.analyze.compare import check_same_tokenizer, compare
    from moekit.analyze.report import write
    from moekit.analyze.run import corpus_rows
    from moekit.io.tokenizer import tokenizer_for
    from moekit.errors import MoekitError
    from moekit.io.load import check_model, default_model
    from moekit.io.outputs import check_output
    from moekit.progress import phase

    with user_errors():
        names = list(dict.fromkeys(models or [default_model()]))
        if len(names) > 2:
            raise MoekitError(f"analyze compares at most two models (got {len(names)}).")
        for name in names:
            check_model(name)
            within_positions(name, "--seq-len", seq_len)
        check_output(out)  # before any data is read or weight loaded
        specs = [s.strip() for s in data.split(",") if s.strip()]
        if focus is not None and focus not in specs:
            specs.append(focus)
        if not specs:
            raise MoekitError("--data names no corpus.")
        tokenizers = [tokenizer_for(name, tokenizer) for name in names]
        if tokenizer is None:
            check_same_tokenizer(names, tokenizers)
        lent = [open_streamed(name, device, compute_dtype) for name in names]  # skeletons and embeddings only
        for name, model in zip(names, lent):
            if model.family is None:
                raise MoekitError(f"{name} is not a Mixture-of-Experts model of a supported family: it has no "
                                  "router to analyze.")
        with phase(f"tokenizing {', '.join(specs)}", enabled=not json_out):
            rows = {spec: corpus_rows(spec, tokenizers[0], samples=samples, seq_len=seq_len, seed=seed,
                                      text_field=text_field) for spec in specs}
        decode = lambda i: tokenizers[0].decode([i])  # noqa: E731
        results = []
        for name, model in zip(names, lent):
            spill = budget(activation_budget)
            results.append(analyze(model, rows, focus=focus,
                                   candidates=candidates, batch_size=batch_size, position_buckets=position_buckets,
                                   prefetch_tokens=prefetch_tokens, decode=decode, name=name, progress=not json_out,
                                   activations=spill))
            spill.close()
        comparison = compare(results[0], results[1]) if len(results) == 2 else None
        with phase(f"writing {out}: figures, report.html, analysis.json", enabled=not json_out):
            written = write(out, results, comparison)
        if json_out:
            print_json({**written, "models": [{"model": r.model, "summary": r.summary, "attribution": r.attribution,
                                               "seconds": r.meta["seconds"]} for r in results],
                        "corpora": results[0].corpora, "comparison": comparison})
            return
        for r in results:
            s = r.summary
            say(
                f"{r.model}: {s['moe_layers']} MoE layers, {r.meta['tokens']} tokens, "
                f"{r.meta['seconds']:.1f}s — entropy/log E {s['entropy_normalized']:.3f}, load max/mean "
                f"{s['imbalance']:.2f}, token-id lookup {s['token_lookup_agreement']:.1%} (baseline "
                f"{s['token_static_agreement']:.1%}), next-layer recall@k "
                + ("–" if s["prefetch_recall"] is None else f"{s['prefetch_recall']:.1%}"))
        say(f"wrote {len(written['figures'])} figures, report.html and analysis.json to {written['out']}")
