"""Fewer expert calls per token, measured: quality and wall-clock speed of every dynamic
routing policy and static option at 75% and 50% of the original expert calls.

On each reference model (ref-fine: 32 experts top-4; ref-coarse: 8 experts top-2), for
each target fraction: the three calibrated policies (`routing_policy` with
``target_fraction``: skip, threshold, kmin_threshold), static top-k (`topk` with a
``target`` average, per layer chosen on data), and for the chart static expert pruning
(prune-25, prune-50 presets, which keep top-k: fewer experts held, not fewer computed).
Each is compressed from the shipped model (calibration: 64 × 256 tokens of stdlib:calib),
evaluated on 32768 tokens spread over stdlib:eval (rows of 256, streamed), and timed with
`moekit.eval.speed.measure_speed` (a prefill of the first 512 tokens of stdlib:eval, then
128 greedy decode steps with the KV cache; median of 5 rounds, the variants timed
round-robin; one thread).

``--synthetic`` times the same policies on a synthetic checkpoint with Qwen3-30B-A3B's layer
shapes (hidden 2048, 64 experts of width 768, top-8; random weights: speed only), written to
/tmp by benchmarks/synthetic.py, with the layer count that fits this machine's memory in fp32.

Results merge into benchmarks/results/dynamic.json (rerun to resume); the chart is
benchmarks/results/dynamic.png.

    python benchmarks/dynamic.py --models ref-fine ref-coarse
    python benchmarks/dynamic.py --synthetic --layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
WORK = Path("/tmp/moekit-dynamic")
EVAL_TOKENS = 32768
POLICIES = ("skip", "threshold", "kmin_threshold")


def variants(top_k: int) -> dict[str, dict | None]:
    """name -> recipe (None: the model as shipped)."""
    out: dict[str, dict | None] = {"original": None}
    for fraction in (0.75, 0.5):
        share = f"{round(fraction * 100)}%"
        for policy in POLICIES:
            # kmin 1 would make kmin_threshold the skip rule; half the top-k is its own point
            extra = {"kmin": max(1, top_k // 2)} if policy == "kmin_threshold" else {}
            out[f"{policy} {share}"] = {"steps": [{"type": "routing_policy", "policy": policy,
                                                   "target_fraction": fraction, **extra}]}
        out[f"static top-k {share}"] = {"steps": [{"type": "topk", "target": fraction * top_k}]}
    out["prune-25"] = "prune-25"
    out["prune-50"] = "prune-50"
    return out


def build(model: str, recipe, out: Path) -> Path:
    import moekit
    from moekit.io.load import check_model

    if recipe is None:
        return check_model(model)
    if not out.is_dir():
        moekit.compress(model, recipe, out_dir=out, n_samples=64, seq_len=256, progress=False, resume=True)
    return out


def quality(folder: Path) -> dict:
    import moekit
    from moekit.eval.rows import spread_rows
    from moekit.data.tokens import evaluation_stream
    from moekit.io.tokenizer import tokenizer_for
    from moekit.io.layered import LayeredModel

    rows = spread_rows(evaluation_stream("stdlib:eval", tokenizer_for(str(folder))).input_ids, EVAL_TOKENS, 256)
    result = moekit.evaluate(LayeredModel.from_checkpoint(folder), rows, context_length=256, stride=255,
                             progress=False)
    return {"perplexity": result.perplexity, "accuracy": result.accuracy,
            "experts_per_token": result.experts_per_token,
            "experts_per_token_per_layer": {l.index: l.experts_per_token for l in result.layers}}


def speeds(models: dict[str, Callable[[], torch.nn.Module]], runs: int, decode: int = 128) -> dict[str, dict]:
    """Prefill and decode tokens/s of every model (``models``: name -> a function giving it
    ready to run), timed round-robin, one generation of each per round after one untimed
    round, so that drifting machine load touches all alike."""
    import statistics

    from moekit.data.tokens import evaluation_stream
    from moekit.io.tokenizer import tokenizer_for
    from moekit.eval.speed import measure_speed

    # real text: a policy's work depends on how confidently the router routes it
    prompt = evaluation_stream("stdlib:eval", tokenizer_for("moekit/ref-fine")).input_ids[None, :512]
    timings: dict[str, list] = {name: [] for name in models}
    for round_ in range(runs + 1):
        for name, ready in models.items():
            timing = measure_speed(ready(), prefill=512, decode=decode, runs=1, warmup=0, prompt=prompt)
            if round_:
                timings[name].append(timing)
    return {name: {"prefill_tokens_per_s": statistics.median(t.prefill_tokens_per_s for t in runs_),
                   "decode_tokens_per_s": statistics.median(t.decode_tokens_per_s for t in runs_),
                   "prefill_seconds": [s for t in runs_ for s in t.prefill_seconds],
                   "decode_seconds": [s for t in runs_ for s in t.decode_seconds], "threads": runs_[0].threads}
            for name, runs_ in timings.items()}


def run_reference(name: str, results: dict, runs: int, timed: bool = True) -> None:
    import moekit

    top_k = moekit.moe_layers(moekit.load(f"moekit/{name}"))[0].top_k
    entries = results.setdefault("models", {}).setdefault(name, {})
    folders = {}
    for variant, recipe in variants(top_k).items():
        folders[variant] = build(f"moekit/{name}", recipe, WORK / name / variant.replace(" ", "_").replace("%", ""))
        if variant not in entries:
            entries[variant] = {"recipe": recipe, **quality(folders[variant])}
            save(results)
            print(name, variant, round(entries[variant]["perplexity"], 3), flush=True)
    if timed and any("decode_tokens_per_s" not in entry for entry in entries.values()):
        loaded = {variant: moekit.load(str(folder)) for variant, folder in folders.items()}  # small models
        for variant, timing in speeds({v: (lambda m=m: m) for v, m in loaded.items()}, runs).items():
            entries[variant].update(timing)
        save(results)


def run_synthetic(results: dict, layers: int, runs: int, timed: bool = True) -> None:
    """Speed only. Each policy is calibrated by `moekit.compress` on stdlib:calib tokens of the
    random model; the weights do not change, so one copy in memory is timed with each
    policy installed in turn (the compressed copies are deleted once their policy is read)."""
    import moekit
    from moekit.arch.layout import POLICY_KEY

    folder = WORK / f"synthetic-{layers}"
    if not folder.is_dir():
        subprocess.run([sys.executable, str(Path(__file__).parent / "synthetic.py"), str(folder), "--preset", "s24",
                        "--layers", str(layers)], check=True)
    policies = results.setdefault("synthetic_policies", {})
    for variant in (*(f"{p} 50%" for p in POLICIES), "skip 75%"):
        if variant in policies:
            continue
        policy, share = variant.split()
        recipe = {"steps": [{"type": "routing_policy", "policy": policy, "target_fraction": int(share[:-1]) / 100}]}
        out = build(str(folder), recipe, WORK / f"synthetic-{layers}-{policy}-{share[:-1]}")
        policies[variant] = json.loads((out / "config.json").read_text())[POLICY_KEY]
        shutil.rmtree(out)
        save(results)
    if not timed:
        return
    model = moekit.load(str(folder))

    def ready(policy):
        moekit.set_routing_policy(model, policy)
        return model

    # 64 decode steps: a synthetic decode step takes a large share of a second on this CPU
    timed = speeds({"original": lambda: ready(None)} | {v: (lambda p=p: ready(p)) for v, p in policies.items()},
                   runs, decode=64)
    results["synthetic"] = {"layers": layers, "shapes": "hidden 2048, 64 experts of 768, top-8", "decode": 64,
                            **timed}
    save(results)


def save(results: dict) -> None:
    """Write ``results`` merged into what is on disk (this process's values win), so runs of
    the reference and the synthetic parts in two processes keep each other's work."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "dynamic.json"
    on_disk = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(_merged(on_disk, results), indent=2) + "\n")


def _merged(old: dict, new: dict) -> dict:
    out = dict(old)
    for key, value in new.items():
        out[key] = _merged(old[key], value) if isinstance(value, dict) and isinstance(old.get(key), dict) else value
    return out


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results.get("models", {})
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, (name, entries) in zip(axes[0], models.items()):
        base = entries["original"]
        for variant, entry in entries.items():
            x = entry["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            y = entry["perplexity"] - base["perplexity"]
            marker = "s" if variant.startswith("prune") else "^" if variant.startswith("static") else "o"
            axis.scatter(x, y, marker=marker)
            axis.annotate(variant, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        axis.set_title(name)
        axis.set_xlabel("decode speed-up (measured, same run)")
        axis.set_ylabel("Δ perplexity on stdlib:eval")
        axis.axhline(0, color="grey", linewidth=0.5)
    figure.tight_layout()
    figure.savefig(RESULTS / "dynamic.png", dpi=120)


def render(results: dict) -> str:
    lines = []
    for name, entries in results.get("models", {}).items():
        base = entries["original"]
        lines += [f"**{name}**", "", "| variant | experts/token | Δ perplexity | accuracy | prefill speed-up | "
                  "decode speed-up |", "|---|---|---|---|---|---|"]
        for variant, e in entries.items():
            lines.append(f"| {variant} | {e['experts_per_token']:.2f} | {e['perplexity'] - base['perplexity']:+.3f} | "
                         f"{e['accuracy']:.2%} | {e['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}× | "
                         f"{e['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}× |")
        lines.append("")
    if synthetic := results.get("synthetic"):
        base = synthetic["original"]
        lines += [f"**synthetic** ({synthetic['layers']} layers; {synthetic['shapes']})", "",
                  "| variant | prefill tokens/s | decode tokens/s | decode speed-up |", "|---|---|---|---|"]
        for variant, e in synthetic.items():
            if isinstance(e, dict) and "decode_tokens_per_s" in e:
                lines.append(f"| {variant} | {e['prefill_tokens_per_s']:.0f} | {e['decode_tokens_per_s']:.2f} | "
                             f"{e['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[], help="reference models (ref-fine, ref-coarse)")
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--layers", type=int, default=8, help="synthetic: decoder layers")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="forget earlier results")
    parser.add_argument("--quality-only", action="store_true",
                        help="build and evaluate, time later (timings want a quiet machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = RESULTS / "dynamic.json"
    results = {} if args.fresh or not path.is_file() else json.loads(path.read_text())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results.update(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                   threads=args.threads, date=str(date.today()), commit=commit)
    for name in args.models:
        run_reference(name, results, args.runs, timed=not args.quality_only)
    if args.synthetic:
        run_synthetic(results, args.layers, args.runs, timed=not args.quality_only)
    if args.quality_only:
        return
    if results.get("models"):
        plot(results)
    print(render(results))


if __name__ == "__main__":
    main()
