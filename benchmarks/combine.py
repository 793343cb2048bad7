"""Combining dense models trained on different corpora into one MoE (Branch-Train-MiX).

1. seed: a small dense Qwen3 (ref-fine's tokenizer) trained from scratch on an equal mix
   of stdlib code and local man pages (benchmarks/corpora.py);
2. branches: the seed trained further on the stdlib only (A) and on man pages only (B),
   every weight (BTX), or only the MLPs (so the attention `combine` averages is the seed's);
3. `moekit.build.combine([A, B])`: each branch's MLP one expert of every layer, attention,
   norms and embeddings averaged, routers from each branch's mean MLP input on its own
   data ("hidden"), top-2 of 2 (a learned per-token mixture);
4. router-only training on the mix (every other weight frozen);
5. held-out perplexity of every model on the stdlib eval split and on man pages.

Goal (issue 14): the combined model within 5% of the better input on each corpus. Every
stage resumes (rerun the same command). Writes ``--out`` and prints the Markdown table.

    python benchmarks/combine.py --threads 1 --work runs/combine-seed1600 \
        --out benchmarks/results/combine-seed1600-lr1e-4.json        # the published run
    python benchmarks/combine.py --threads 1 --seed-steps 400 --router-lr 1e-3 --work runs/combine \
        --out benchmarks/results/combine.json                          # the first, weaker seed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from datetime import date
from pathlib import Path

from build import evaluate, train  # the same evaluation and training as benchmarks/build.py
from corpora import corpus, mixture

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent
SEED_SPEC = dict(family="qwen3", vocab_size=8192, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=32, intermediate_size=384, max_position_embeddings=1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed-steps", type=int, default=1600)
    parser.add_argument("--branch-steps", type=int, default=300)
    parser.add_argument("--router-steps", type=int, default=150)
    parser.add_argument("--protocols", nargs="+", choices=("all", "mlp"), default=["all", "mlp"],
                        help="what learns in the branches: every weight (BTX), the MLPs only, or both")
    parser.add_argument("--router-lr", type=float, default=1e-4, help="peak lr of the router-only training")
    parser.add_argument("--router-z-loss", type=float, default=1e-3,
                        help="z-loss coefficient of the router-only training (moekit train's default 1e-3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--work", type=Path, default=Path("runs") / "combine-seed1600")
    parser.add_argument("--out", type=Path, default=RESULTS / "combine-seed1600-lr1e-4.json")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from moekit.build.combine import combine

    mix, man_train, man_eval = mixture(["stdlib", "man"], "train"), corpus("man", "train"), corpus("man", "eval")
    args.work.mkdir(parents=True, exist_ok=True)
    spec = args.work / "seed_spec.json"
    spec.write_text(json.dumps(SEED_SPEC))
    runs = {}
    runs["seed (mix)"] = train(None, args.work / "seed", args.seed_steps, data=str(mix), lr=2e-3, arch=str(spec),
                               tokenizer=REPO / "src" / "moekit" / "zoo" / "ref-fine")
    seed = Path(runs["seed (mix)"]["model"])
    for protocol in args.protocols:  # what learns in the branches
        suffix = "" if protocol == "all" else "-mlp"
        label = "" if protocol == "all" else " (MLP only)"
        a, b = f"A: seed + stdlib{label}", f"B: seed + man{label}"
        runs[a] = train(seed, args.work / f"stdlib{suffix}", args.branch_steps, data="stdlib", lr=1e-3,
                        train_only=protocol)
        runs[b] = train(seed, args.work / f"man{suffix}", args.branch_steps, data=str(man_train),
                        eval_data=str(man_eval), lr=1e-3, train_only=protocol)
        combined = args.work / f"combined{suffix}"
        if not combined.is_dir():
            combine([Path(runs[a]["model"]), Path(runs[b]["model"])], out_dir=combined, top_k=2, router="hidden",
                    data=["stdlib:calib", str(man_train)])
        runs[f"combined A+B{label}, step 0"] = {"model": str(combined), "steps": 0}
        z = "" if args.router_z_loss == 1e-3 else f"-z{args.router_z_loss:g}"
        z += "" if args.router_lr == 1e-3 else f"-lr{args.router_lr:g}"  # 1e-3: the first runs' folders
        runs[f"combined A+B{label}, router-only"] = train(combined, args.work / f"router{suffix}{z}", args.router_steps,
                                                          data=str(mix), lr=args.router_lr, train_only="routers",
                                                          z_loss_coef=args.router_z_loss)
    corpora = {"stdlib": "stdlib:eval", "man": str(man_eval)}
    for run in runs.values():
        run["perplexity"] = {name: evaluate(Path(run["model"]), spec)["perplexity"] for name, spec in corpora.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": str(date.today()),
               "commit": commit, "seed_spec": SEED_SPEC, "tokens_per_step": 16 * 256,
               "steps": {"seed": args.seed_steps, "branch": args.branch_steps, "router": args.router_steps},
               "router_z_loss": args.router_z_loss, "router_lr": args.router_lr,
               "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))


def render(results: dict) -> str:
    runs = results["runs"]
    lines = ["| model | training steps | stdlib eval ppl | man pages eval ppl |", "|---|---|---|---|"]
    for name, run in runs.items():
        lines.append(f"| {name} | {run['steps']} | {run['perplexity']['stdlib']:.3f} | {run['perplexity']['man']:.3f} |")
    for label in ("", " (MLP only)"):
        if f"combined A+B{label}, router-only" not in runs:
            continue
        inputs = (f"A: seed + stdlib{label}", f"B: seed + man{label}")
        best = {c: min(runs[n]["perplexity"][c] for n in inputs) for c in ("stdlib", "man")}
        final = runs[f"combined A+B{label}, router-only"]["perplexity"]
        gaps = {c: final[c] / best[c] - 1 for c in best}
        lines += ["", f"branches trained{label or ' (all weights)'}: combined (router-only) against the better input: "
                  + ", ".join(f"{c} {100 * g:+.1f}%" for c, g in gaps.items())
                  + ("  (goal met: within 5% on both)" if all(g <= 0.05 for g in gaps.values()) else "  (goal missed)")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
