"""Quantization on the reference models: round to nearest and GPTQ at 8/4/3/2 bits (every
decoder Linear and routed expert, groups of 128 halved to fit the widths), GPTQ's expert
calibration options at 3 bits, and ``prune-50-w4``.

Each configuration runs `moekit.compress` from the shipped checkpoint (calibration on the
shipped ``stdlib:calib`` split), then reads the saved compressed-tensors checkpoint back
with moekit (decompressed exactly as transformers does) and evaluates it on rows of 256
tokens spread over the shipped ``stdlib:eval`` split: perplexity, next-token accuracy,
checkpoint bytes (the safetensors files, headers included), whether the tensors' bytes are
the ones `moekit.plan` predicted, and the
compress wall time.

    python benchmarks/quantization.py [--models moekit/ref-fine moekit/ref-coarse] [--eval-tokens 32768]
    python benchmarks/quantization.py --render benchmarks/results/quantization.json

Writes ``benchmarks/results/quantization.json`` (``--out``) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from datetime import date
from pathlib import Path


def configs() -> list[tuple[str, dict | str]]:
    """(label, recipe): the recipes to measure."""
    fit = {"type": "quantize", "group_size": 128, "fit_group_size": True}
    out: list[tuple[str, dict | str]] = []
    for method in ("rtn", "gptq"):
        for bits in (8, 4, 3, 2):
            out.append((f"{method} w{bits}", {"steps": [{**fit, "method": method, "bits": bits}]}))
    for calibration in ("all", "gate_weighted"):
        out.append((f"gptq w3, experts calibrated on {calibration.replace('_', '-')} tokens",
                    {"steps": [{**fit, "bits": 3, "expert_calibration": calibration}]}))
    for bits in (3, 2):
        out.append((f"gptq w{bits} + router repair", {"steps": [{**fit, "bits": bits, "router_repair": True}]}))
    # the same byte budgets as the mixed-precision runs: Linears 4-bit, experts uniform
    for bits in (3, 2):
        out.append((f"gptq w4, experts w{bits}", {"steps": [{**fit, "bits": 4, "expert_bits": bits}]}))
    for average in (3.0, 2.5):
        out.append((f"gptq w4, experts mixed {average} bits", {"steps": [{**fit, "bits": 4, "average_bits": average}]}))
        out.append((f"moe-{average:g}bit (mixed {average} + router repair)", f"moe-{average:g}bit"))
    out.append(("prune-50-w4 (REAP + refit, then gptq w4)", "prune-50-w4"))
    return out


def measure(model: str, label: str, recipe, rows, work: Path) -> dict:
    import moekit
    from moekit.eval.rows import evaluate_rows as _evaluate
    from moekit.io.layered import LayeredModel

    out = work / label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "").replace("+", "")
    plan = moekit.plan(model, recipe)
    planned = plan["after"]["bytes"] if all(q["exact"] for q in plan["after"]["quantization"]) else None
    start = time.perf_counter()
    report = moekit.compress(model, recipe, out_dir=out, n_samples=32, seq_len=256, progress=False)
    seconds = time.perf_counter() - start
    result = _evaluate(LayeredModel.from_checkpoint(out), rows, 8, False)
    from moekit.io.checkpoint import Checkpoint

    stored = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    step = next(s for s in report["steps"] if s["type"] == "quantize")
    return {"label": label, "seconds": round(seconds, 1), "bytes": stored, "tensor_bytes": Checkpoint(out).stored_bytes,
            "planned_bytes": planned, **result, "topk_agreement": step.get("topk_agreement"),
            "expert_bits": step.get("bits")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["moekit/ref-fine", "moekit/ref-coarse"])
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quantization.json")
    parser.add_argument("--render", type=Path, help="print the tables of a results file and stop")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return

    import torch

    from moekit.eval.rows import evaluate_rows as _evaluate
    from moekit.eval.rows import spread_rows
    from moekit.data.tokens import evaluation_stream
    from moekit.io.tokenizer import tokenizer_for
    from moekit.io.load import open_model
    from moekit.io.load import check_model

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "threads": torch.get_num_threads(),
               "date": str(date.today()), "commit": commit, "models": {}}
    for model in args.models:
        rows = spread_rows(evaluation_stream("stdlib:eval", tokenizer_for(model)).input_ids, args.eval_tokens, 256)
        folder = check_model(model)
        original = _evaluate(open_model(model, dtype=torch.float32, device="cpu"), rows, 8, False)
        entry = {"original": {**original, "bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))},
                 "runs": []}
        with tempfile.TemporaryDirectory() as tmp:
            for label, recipe in configs():
                run = measure(model, label, recipe, rows, Path(tmp))
                run["delta_perplexity"] = run["perplexity"] - original["perplexity"]
                entry["runs"].append(run)
                print(model, json.dumps(run), flush=True)
        results["models"][model] = entry
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))


def render(results: dict) -> str:
    lines = []
    for model, entry in results["models"].items():
        base = entry["original"]
        lines += [f"**{model}** (bf16: perplexity {base['perplexity']:.3f}, accuracy {base['accuracy']:.2%}, "
                  f"{base['bytes'] / 2**20:.1f} MiB)", "",
                  "| recipe | perplexity | Δ over bf16 | accuracy | checkpoint MiB | tensor bytes = plan | compress s "
                  "| top-k agreement (before → after repair) |",
                  "|---|---|---|---|---|---|---|---|"]
        for run in entry["runs"]:
            same = "yes" if run["tensor_bytes"] == run["planned_bytes"] else "(decided by calibration)" \
                if run["planned_bytes"] is None else f"{run['planned_bytes']:,} vs {run['tensor_bytes']:,}"
            agreement = run.get("topk_agreement") or {}
            pairs = list(agreement.values())
            agree = f"{sum(a for a, _ in pairs) / len(pairs):.3f} → {sum(b for _, b in pairs) / len(pairs):.3f}" \
                if pairs else "-"
            lines.append(f"| {run['label']} | {run['perplexity']:.3f} | {run['delta_perplexity']:+.3f} | "
                         f"{run['accuracy']:.2%} | {run['bytes'] / 2**20:.1f} | {same} | {run['seconds']:.0f} "
                         f"| {agree} |")
        for name, run in sorted(results.get("anchor", {}).get(model, {}).items()):
            if isinstance(run, dict):  # llm-compressor's runs (benchmarks/llmcompressor_anchor.py)
                lines.append(f"| llm-compressor GPTQ {name.upper()} (its own run) | {run['perplexity']:.3f} | "
                             f"{run['perplexity'] - base['perplexity']:+.3f} | {run['accuracy']:.2%} | "
                             f"{run['bytes'] / 2**20:.1f} (fp32 rest) | - | {run['seconds']:.0f} | - |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
