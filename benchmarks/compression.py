"""Expert pruning and merging on the reference models, at 25% and 50% of routed experts
removed: every pruning criterion and the reconstruction search with uniform and global
budgets (``--suite prune``), and the merging variants (``--suite merge``).

One calibration per model (shipped ``stdlib:calib`` split) feeds every method; each
configuration then runs in its own process (load, prune, evaluate on the shipped
``stdlib:eval`` split) so that its wall time and peak memory are its own.

    python benchmarks/compression.py [--suite prune|merge|all] [--models moekit/ref-fine ...] [--eval-tokens 32768]

Writes ``benchmarks/results/<suite>.json`` and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
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


def configs(suite: str) -> list[dict]:
    """The steps to measure, each one recipe step."""
    steps = []
    for remove in REMOVE:
        if suite in ("prune", "all"):
            steps += [{"type": "prune", "method": m, "remove": remove, "budget": b} for b in BUDGETS for m in METHODS]
        if suite in ("merge", "all"):
            steps += [{"type": "merge", "remove": remove, **variant} for variant in MERGES]
    return steps


def label(step: dict) -> str:
    if step["type"] == "prune":
        return f"prune {step['method']} ({step['budget']})"
    align = "" if step.get("align", True) else ", unaligned"
    return f"merge {step['grouping']}, router {step['router']}{align}"
CALIB = dict(n_samples=64, seq_len=256, seed=0)


def calibrate_once(model_name: str, folder: Path) -> dict:
    from moekit.calib.calibrate import calibrate
    from moekit.calib.observers import STATISTICS
    from moekit.data.tokens import calibration_tokens, tokenizer_for
    from moekit.io.load import load

    tokens = calibration_tokens("stdlib:calib", tokenizer_for(model_name), **CALIB)
    start = time.perf_counter()
    stats = calibrate(load(model_name), tokens.input_ids, statistics=set(STATISTICS),
                      hidden_sample=1024, progress=False, meta=tokens.describe())
    stats.save(folder)
    return {"seconds": round(time.perf_counter() - start, 2), "tokens": tokens.input_ids.numel()}


def one_config(model_name: str, stats_dir: str, step: dict, eval_tokens: int) -> dict:
    """Runs in a child process."""
    import torch

    from moekit.calib.stats import CalibrationStats
    from moekit.data.tokens import evaluation_stream, tokenizer_for
    from moekit.eval.perplexity import evaluate
    from moekit.io.load import load
    from moekit.recipe import Recipe

    torch.set_num_threads(2)
    model = load(model_name)
    stats = CalibrationStats.load(stats_dir, model=model)
    recipe = Recipe.from_dict({"steps": [step]}) if step else None
    start = time.perf_counter()
    if recipe is not None:
        recipe.steps[0].apply(model, stats)
    seconds = time.perf_counter() - start
    stream = evaluation_stream("stdlib:eval", tokenizer_for(model_name)).input_ids[:eval_tokens]
    result = evaluate(model, stream, context_length=256, stride=128, routing=False, progress=False)
    return {"perplexity": result.perplexity, "accuracy": result.accuracy, "tokens": result.tokens,
            "step_seconds": round(seconds, 2),
            "peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_child(model_name: str, stats_dir: str, step: dict, eval_tokens: int) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from compression import one_config; "
            f"print(json.dumps(one_config({model_name!r}, {stats_dir!r}, {step!r}, {eval_tokens})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["moekit/ref-fine", "moekit/ref-coarse"])
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--suite", choices=["prune", "merge", "all"], default="all")
    args = parser.parse_args()
    results = {"machine": f"{platform.machine()} CPU, 2 threads", "date": str(date.today()),
               "calibration": CALIB, "eval_tokens": args.eval_tokens, "models": {}}
    for model_name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            stats_dir = str(Path(tmp) / "stats")
            entry = {"calibration": calibrate_once(model_name, Path(stats_dir)), "rows": []}
            entry["baseline"] = run_child(model_name, stats_dir, {}, args.eval_tokens)
            for step in configs(args.suite):
                row = {"remove": step["remove"], "config": label(step), "step": step,
                       **run_child(model_name, stats_dir, step, args.eval_tokens)}
                entry["rows"].append(row)
                print(json.dumps({"model": model_name, **row}), flush=True)
            results["models"][model_name] = entry
    out = Path(__file__).parent / "results" / f"{args.suite}.json"
    out.write_text(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = []
    for model_name, entry in results["models"].items():
        base = entry["baseline"]
        lines += [f"\n### {model_name} — unpruned: perplexity {base['perplexity']:.2f}, "
                  f"accuracy {base['accuracy']:.2%} ({base['tokens']} tokens)\n",
                  "| removed | configuration | perplexity | Δ ppl | accuracy | step s | peak MiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in entry["rows"]:
            lines.append(f"| {r['remove']:.0%} | {r['config']} | {r['perplexity']:.2f} | "
                         f"{r['perplexity'] - base['perplexity']:+.2f} | {r['accuracy']:.2%} | "
                         f"{r['step_seconds']:.1f} | {r['peak_memory_mib']:.0f} |")
    lines.append(f"\n{results['machine']}, {results['date']}; calibration {results['calibration']}, "
                 f"evaluation on the first {results['eval_tokens']} tokens of stdlib:eval (context 256, stride 128).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
