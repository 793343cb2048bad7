"""Building MoEs from the dense reference: upcycle and split variants at step 0, then after
the same continued training as the dense model itself.

Each variant is built from ``--dense`` (default: the shipped ``moekit/ref-dense`` once it
exists), evaluated on rows of 256 tokens spread over the shipped ``stdlib:eval`` split
(step 0), then trained with `moekit train --init` (router losses on) for ``--steps`` steps
of 16 × 256 tokens on the ``stdlib`` train split at peak ``--lr``; the dense model is
trained the same way. The default lr is the dense reference's last one (1e-4: its final
cosine stage ends at 10% of 1e-3), as Sparse Upcycling continues the dense schedule;
re-warming a converged model to a higher lr first costs it what it had learned.
Every run resumes where it stopped (rerun the same command), so the whole benchmark can
span sessions. Writes ``benchmarks/results/build.json`` and ``build.png`` (the learning
curves) and prints the Markdown table.

    python benchmarks/build.py --steps 250 [--lr 1e-4] [--only NAME ...]
    python benchmarks/build.py --render benchmarks/results/build.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
EVAL_TOKENS = 32768


def variants() -> dict[str, tuple[str, dict]]:
    """name -> (builder, options)."""
    out: dict[str, tuple[str, dict]] = {}
    for method, extra in (("copy", {}), ("drop", {"drop_ratio": 0.5})):
        out[f"upcycle {method} 8e top-2"] = ("upcycle", dict(experts=8, top_k=2, method=method, **extra))
    out["upcycle virtual-groups 8e top-2 (G=2)"] = ("upcycle", dict(experts=8, top_k=2, method="virtual-groups",
                                                                   groups=2))
    out["upcycle copy 8e top-2 + shared expert (glm4_moe)"] = ("upcycle", dict(experts=8, top_k=2, method="copy",
                                                                               family="glm4_moe"))
    out["upcycle virtual-groups 32e top-4 (G=4)"] = ("upcycle", dict(experts=32, top_k=4, method="virtual-groups",
                                                                    groups=4))
    for by in ("random", "cluster", "coactivation"):
        for experts, top_k in ((8, 2), (32, 8)):
            out[f"split {by} {experts}e top-{top_k}"] = ("split", dict(experts=experts, top_k=top_k, by=by))
    return out


def build(kind: str, dense: Path, out: Path, options: dict) -> dict:
    from moekit.build.split import split
    from moekit.build.upcycle import upcycle

    if (out / f"{kind}.json").is_file():
        return json.loads((out / f"{kind}.json").read_text())
    return (upcycle if kind == "upcycle" else split)(dense, out_dir=out, **options)


def evaluate(folder: Path, corpus: str = "stdlib:eval") -> dict:
    """Perplexity of ``folder`` on ``EVAL_TOKENS`` tokens spread over ``corpus``, streamed."""
    from moekit.eval.rows import evaluate_rows as _evaluate
    from moekit.eval.rows import spread_rows
    from moekit.data.tokens import evaluation_stream
    from moekit.io.tokenizer import tokenizer_for
    from moekit.io.layered import LayeredModel

    rows = spread_rows(evaluation_stream(corpus, tokenizer_for(str(folder))).input_ids, EVAL_TOKENS, 256)
    return _evaluate(LayeredModel.from_checkpoint(folder), rows, 8, False)


def train(init: Path | None, out: Path, steps: int, *, data: str = "stdlib", eval_data: str = "stdlib:eval",
          lr: float = 3e-4, **settings) -> dict:
    """Training of ``init`` (router losses on; ``settings`` may give ``arch`` and
    ``tokenizer`` to start from scratch, or ``train_only``) for ``steps`` steps of 16 × 256
    tokens; the curve."""
    from moekit.train.run import run_training

    options = dict(arch="", tokenizer=None, vocab_size=8192, seq_len=256, batch_size=16, grad_accum=1,
                   warmup=max(1, steps // 20), checkpoint_every=max(1, steps // 8), eval_every=max(1, steps // 8),
                   seed=0, aux_loss_coef=0.01, z_loss_coef=1e-3, bias_update_rate=None) | settings
    summary = run_training(init=init, data=data, eval_data=eval_data, text_field="text", out=out,
                           show_progress=False, steps=steps, lr=lr, **options)
    log = json.loads((out / "train_log.json").read_text())
    return {"steps": summary["steps"], "evals": [{"step": e["step"], "loss": e["loss"]} for e in log["evals"]],
            "model": str(out / "model"), "train_seconds": summary["train_seconds_all_sessions"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, help="the dense model (default: moekit/ref-dense)")
    parser.add_argument("--steps", type=int, default=250, help="continued-training steps for every model")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak lr of the continued training")
    parser.add_argument("--work", type=Path, default=Path("runs") / "build")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS / "build.json")
    parser.add_argument("--render", type=Path, help="print the table of a results file, redraw its PNG, and stop")
    args = parser.parse_args()
    if args.render:  # and redraw its curves beside it
        results = json.loads(args.render.read_text())
        plot(results, args.render.with_suffix(".png"))
        print(render(results))
        return
    from moekit.io.load import check_model

    dense = args.dense or check_model("moekit/ref-dense")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": str(date.today()),
               "commit": commit, "dense": str(dense), "steps": args.steps, "lr": args.lr,
               "tokens_per_step": 16 * 256, "runs": {}}
    if args.out.is_file():  # runs of the same setting measured earlier (--only, or another session) stay
        earlier = json.loads(args.out.read_text())
        if (earlier["dense"], earlier["steps"], earlier.get("lr", 3e-4)) == (str(dense), args.steps, args.lr):
            results["runs"] = earlier["runs"]
    runs = {"dense (continued)": ("dense", {})} | variants()
    for name, (kind, options) in runs.items():
        if args.only and name not in args.only:
            continue
        folder = args.work / name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")
        built = dense if kind == "dense" else folder / "model0"
        report = {} if kind == "dense" else build(kind, dense, built, options)
        entry = {"kind": kind, "options": options, "step0": evaluate(built)}
        entry.update({k: report[k] for k in ("max_abs_logit_difference", "layers") if k in report})
        entry["trained"] = train(built, folder / "train", args.steps, lr=args.lr)
        entry["final"] = evaluate(Path(entry["trained"]["model"]))
        results["runs"][name] = entry
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(name, json.dumps({"step0": entry["step0"]["perplexity"], "final": entry["final"]["perplexity"]}),
              flush=True)
    plot(results, args.out.with_suffix(".png"))
    print(render(results))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5.5))
    colours = plt.get_cmap("tab20").colors  # twelve runs: tab10 would repeat colours
    style = {"dense": ("-", 2.5), "upcycle": ("-", 1.2), "split": ("--", 1.2)}
    for i, (name, run) in enumerate(results["runs"].items()):
        evals = run["trained"]["evals"]
        line, width = style[run["kind"]]
        axis.plot([e["step"] for e in evals], [e["loss"] for e in evals], line, linewidth=width,
                  color="black" if run["kind"] == "dense" else colours[i % len(colours)], label=name)
    axis.set_xlabel(f"continued-training step ({results['tokens_per_step']} tokens each)")
    axis.set_ylabel("eval loss")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def render(results: dict) -> str:
    lines = [f"dense model: `{results['dense']}`; {results['steps']} steps of continued training each, "
             f"peak lr {results.get('lr', 3e-4):g}",
             "", "| model | perplexity at step 0 | after training | accuracy after | max \\|Δ logit\\| at step 0 "
             "| training s |", "|---|---|---|---|---|---|"]
    for name, run in results["runs"].items():
        difference = run.get("max_abs_logit_difference")
        lines.append(f"| {name} | {run['step0']['perplexity']:.3f} | {run['final']['perplexity']:.3f} | "
                     f"{100 * run['final']['accuracy']:.2f}% | {'—' if difference is None else f'{difference:.1e}'} | "
                     f"{run['trained']['train_seconds']:.0f} |")
    splits = {name: run["layers"] for name, run in results["runs"].items() if run["kind"] == "split"}
    if splits:  # what split.json reports: the MLP output's share the chosen top-k reproduce (oracle's)
        layers = sorted(next(iter(splits.values())), key=int)
        lines += ["", "| split: share of the MLP's output reproduced at step 0 (oracle top-k) | "
                  + " | ".join(f"layer {i}" for i in layers) + " |", "|---" * (len(layers) + 1) + "|"]
        for name, per_layer in splits.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{per_layer[i]['reproduced_share']:.1%} ({per_layer[i]['oracle_share']:.1%})" for i in layers) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
