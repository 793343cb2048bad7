"""Expert pruning and merging on the reference models, at 25% and 50% of routed experts
removed: every pruning criterion and the reconstruction search with uniform and global
budgets (``--suite prune``), the merging variants (``--suite merge``), and both followed
by output compensation (``refit: true``, ``--suite refit``).

One calibration per model (shipped ``stdlib:calib`` split) feeds every method; each
configuration then runs in its own process (load, prune, round to the checkpoint's bf16
as `moekit compress` saves it, evaluate) so that its wall time and peak memory are its
own. Evaluation uses the shipped ``stdlib:eval`` split packed in rows of 256 tokens,
each row its own window (as in the reference models' cards), taking every
``--eval-every``-th row so that all of the split's files are represented.

    python benchmarks/compression.py [--suite prune|merge|refit|all] [--models moekit/ref-fine ...] [--eval-every 4]
    python benchmarks/compression.py --models moekit/ref-coarse --threads 1 --out benchmarks/results/compression-ref-coarse.json
    python benchmarks/compression.py --render benchmarks/results/compression-ref-fine.json benchmarks/results/compression-ref-coarse.json

Writes ``benchmarks/results/<suite>.json`` (or ``--out``) and prints the Markdown tables for
BENCHMARKS.md. Each model's entry records its own machine, threads, date and commit, so
models measured in separate runs (``--models`` one at a time) render together.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

METHODS = ["random", "frequency", "soft_frequency", "ean", "man", "msan", "reap", "reconstruction"]
REMOVE = [0.25, 0.5]
BUDGETS = ["uniform", "global"]
MERGES = [dict(grouping=g, router=r) for g in ("msmoe", "hcsmoe", "score") for r in ("centre", "mean", "fit")]
MERGES.append(dict(grouping="score", router="fit", align=False))
REFITS = [{"type": "prune", "method": m, "budget": "uniform"} for m in ("frequency", "man", "reap", "reconstruction")]
REFITS += [{"type": "prune", "method": "reap", "budget": "global"},
           {"type": "merge", "grouping": "hcsmoe", "router": "mean"},
           {"type": "merge", "grouping": "score", "router": "centre"}]


def configs(suite: str) -> list[dict]:
    """The steps to measure, each one recipe step."""
    steps = []
    for remove in REMOVE:
        if suite in ("prune", "all"):
            steps += [{"type": "prune", "method": m, "remove": remove, "budget": b} for b in BUDGETS for m in METHODS]
        if suite in ("merge", "all"):
            steps += [{"type": "merge", "remove": remove, **variant} for variant in MERGES]
        if suite in ("refit", "all"):
            steps += [{**variant, "remove": remove, "refit": True} for variant in REFITS]
    return steps


def label(step: dict) -> str:
    refit = " + refit" if step.get("refit") else ""
    if step["type"] == "prune":
        return f"prune {step['method']} ({step['budget']}){refit}"
    align = "" if step.get("align", True) else ", unaligned"
    return f"merge {step['grouping']}, router {step['router']}{align}{refit}"
CALIB = dict(n_samples=64, seq_len=256, seed=0)


def calibrate_once(model_name: str, folder: Path) -> dict:
    from moekit.calib.calibrate import calibrate
    from moekit.calib.observers import STATISTICS
    from moekit.data.tokens import calibration_tokens
    from moekit.io.tokenizer import tokenizer_for
    from moekit.io.load import load

    tokens = calibration_tokens("stdlib:calib", tokenizer_for(model_name), **CALIB)
    start = time.perf_counter()
    stats = calibrate(load(model_name), tokens.input_ids, statistics=set(STATISTICS),
                      hidden_sample=8192, progress=False, meta=tokens.describe())
    stats.save(folder)
    return {"seconds": round(time.perf_counter() - start, 2), "tokens": tokens.input_ids.numel()}


def eval_rows(model_name: str, every: int):
    """Every ``every``-th row of 256 tokens of the whole stdlib:eval split."""
    from moekit.data import load_corpus, pack, tokenize_corpus
    from moekit.io.tokenizer import tokenizer_for

    return pack(tokenize_corpus(load_corpus("stdlib:eval"), tokenizer_for(model_name)), 256)[::every]


def one_config(model_name: str, stats_dir: str, step: dict, eval_every: int, threads: int) -> dict:
    """Runs in a child process."""
    import torch

    from moekit.calib.stats import CalibrationStats
    from moekit.io.load import load, stored_dtype
    from moekit.io.save import round_for_storage
    from moekit.recipe import Recipe
    from moekit.train.evaluate import evaluate

    torch.set_num_threads(threads)
    model = load(model_name)
    stats = CalibrationStats.load(stats_dir, model=model)
    recipe = Recipe.from_dict({"steps": [step]}) if step else None
    start = time.perf_counter()
    if recipe is not None:
        recipe.steps[0].apply(model, stats)
    seconds = time.perf_counter() - start
    round_for_storage(model, stored_dtype(model_name))  # score the weights `moekit compress` would save
    result = evaluate(model, eval_rows(model_name, eval_every), batch_size=16)
    return {"perplexity": result.perplexity, "accuracy": result.accuracy, "tokens": result.tokens,
            "step_seconds": round(seconds, 2),
            "peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_child(model_name: str, stats_dir: str, step: dict, eval_every: int, threads: int) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from compression import one_config; "
            f"print(json.dumps(one_config({model_name!r}, {stats_dir!r}, {step!r}, {eval_every}, {threads})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["moekit/ref-fine", "moekit/ref-coarse"])
    parser.add_argument("--eval-every", type=int, default=4, help="evaluate on every N-th 256-token row")
    parser.add_argument("--suite", choices=["prune", "merge", "refit", "all"], default="all")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per configuration")
    parser.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/<suite>.json)")
    parser.add_argument("--render", type=Path, nargs="+",
                        help="print the tables of earlier results JSONs (their models together) and exit")
    args = parser.parse_args()
    if args.render:
        results = joined([json.loads(path.read_text()) for path in args.render])
        print(summary(results) + "\n" + markdown(results))
        return
    results = {"calibration": CALIB, "eval_every": args.eval_every, "models": {}}
    for model_name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            stats_dir = str(Path(tmp) / "stats")
            entry = {"run": run_facts(args.threads), "calibration": calibrate_once(model_name, Path(stats_dir)),
                     "rows": []}
            entry["baseline"] = run_child(model_name, stats_dir, {}, args.eval_every, args.threads)
            for step in configs(args.suite):
                row = {"remove": step["remove"], "config": label(step), "step": step,
                       **run_child(model_name, stats_dir, step, args.eval_every, args.threads)}
                entry["rows"].append(row)
                print(json.dumps({"model": model_name, **row}), flush=True)
            results["models"][model_name] = entry
    out = args.out or Path(__file__).parent / "results" / f"{args.suite}.json"
    out.write_text(json.dumps(results, indent=2))
    print(summary(results) + "\n" + markdown(results))


def joined(runs: list[dict]) -> dict:
    """Several results files as one: their models side by side (same calibration and rows)."""
    first = runs[0]
    for other in runs[1:]:
        if (other["calibration"], other["eval_every"]) != (first["calibration"], first["eval_every"]):
            raise SystemExit("these results used different calibration or evaluation rows; render them apart")
    return {**first, "models": {name: entry for run in runs for name, entry in run["models"].items()}}


def run_facts(threads: int) -> dict:
    """Where and when a model's configurations ran."""
    return {"machine": machine(threads), "date": str(date.today()), "commit": commit()}


def machine(threads: int) -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())
    return f"{cpu}, {os.cpu_count()} cores, {threads} torch thread{'s' * (threads > 1)} per configuration"


def commit() -> str:
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True).stdout.strip()
    return head + (" (with uncommitted changes)" if dirty else "")


def summary(results: dict) -> str:
    """Per model and fraction removed: REAP, the best of each family of methods, and how
    each one's perplexity increase compares with REAP's."""
    lines = ["| model | removed | method | perplexity | Δ ppl | Δ / Δ REAP | accuracy |",
             "|---|---|---|---|---|---|---|"]
    families = [
        ("REAP (uniform)", lambda r: r["config"] == "prune reap (uniform)"),
        ("best other criterion, uniform", lambda r: r["step"]["type"] == "prune" and not r["step"].get("refit")
         and r["step"]["budget"] == "uniform" and r["step"]["method"] != "reap"),
        ("best criterion, global budget", lambda r: r["step"]["type"] == "prune" and not r["step"].get("refit")
         and r["step"]["budget"] == "global"),
        ("best merge", lambda r: r["step"]["type"] == "merge" and not r["step"].get("refit")),
        ("REAP + refit (uniform)", lambda r: r["config"] == "prune reap (uniform) + refit"),
        ("best with refit", lambda r: bool(r["step"].get("refit"))),
    ]
    for model_name, entry in results["models"].items():
        base = entry["baseline"]["perplexity"]
        for remove in sorted({r["remove"] for r in entry["rows"]}):
            rows = [r for r in entry["rows"] if r["remove"] == remove]
            reap = next((r for r in rows if r["config"] == "prune reap (uniform)"), None)
            for name, chosen in families:
                candidates = [r for r in rows if chosen(r)]
                if not candidates:
                    continue
                best = min(candidates, key=lambda r: r["perplexity"])
                ratio = (f"{(best['perplexity'] - base) / (reap['perplexity'] - base):.2f}"
                         if reap and reap["perplexity"] > base else "—")
                lines.append(f"| {model_name} | {remove:.0%} | {name}: {best['config']} | {best['perplexity']:.2f} | "
                             f"{best['perplexity'] - base:+.2f} | {ratio} | {best['accuracy']:.2%} |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    lines = []
    for model_name, entry in results["models"].items():
        base = entry["baseline"]
        calib = entry["calibration"]
        lines += [f"\n### {model_name} — unpruned: perplexity {base['perplexity']:.2f}, "
                  f"accuracy {base['accuracy']:.2%} ({base['tokens']} tokens); one calibration with every "
                  f"statistic: {calib['seconds']:.1f} s for {calib['tokens']} tokens\n",
                  "| removed | configuration | perplexity | Δ ppl | accuracy | step s | peak MiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in entry["rows"]:
            lines.append(f"| {r['remove']:.0%} | {r['config']} | {r['perplexity']:.2f} | "
                         f"{r['perplexity'] - base['perplexity']:+.2f} | {r['accuracy']:.2%} | "
                         f"{r['step_seconds']:.1f} | {r['peak_memory_mib']:.0f} |")
        run = entry["run"]
        lines.append(f"\n{run['machine']}, {run['date']}, commit {run['commit']}.")
    lines.append(f"\nCalibration {results['calibration']}; evaluation on every {results['eval_every']}th "
                 "256-token row of stdlib:eval (each row its own window).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
