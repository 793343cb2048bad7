"""Shrinking inside the experts (`decompose`) against removing experts, at the same number
of routed-expert parameters: 75% and 50% of them kept, on both reference models.

Configurations per share kept: activation-aware per-expert SVD and the shared basis with
low-rank deltas (D²-MoE), each with and without ``refit`` (defaults: whitening by the
expert's input second moment, damping 1.0, ranks by error); SVD whitened by the
gate-weighted moment (SVD-LLM's objective on the routed output, damping 0.01) and plain SVD
(no whitening) as baselines of the whitening; SVD with ``budget: global`` (the layers share
the budget by their measured error); and REAP + refit and HC-SMoE + refit removing 25% / 50% of the
experts (exactly the same routed parameters). One calibration per model (64 × 256 tokens of
the shipped ``stdlib:calib``, hidden sample of 8192 per layer) feeds every configuration;
each then runs in its own process (load, apply the step, round to the checkpoint's bf16 as
`moekit compress` saves it, evaluate) so its time and peak memory are its own. Held-out
perplexity and accuracy on every ``--eval-every``-th 256-token row of ``stdlib:eval`` (as
`benchmarks/compression.py`, whose REAP + refit numbers these reproduce). Bytes are the
output's as stored (bf16). Speed: `moekit.eval.speed.measure_speed` on each saved model,
prefill 512 tokens of stdlib:eval + 128 decode steps, timed round-robin
(`benchmarks/dynamic.py`'s `speeds`), median of ``--runs``.

    OMP_NUM_THREADS=1 python benchmarks/decomposition.py --models moekit/ref-fine moekit/ref-coarse
    python benchmarks/decomposition.py --render
    OMP_NUM_THREADS=1 python benchmarks/decomposition.py --only "svd, global budget" --runs 0   # some configurations

Results merge into ``benchmarks/results/decomposition.json`` (rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import compression as base  # noqa: E402  (calibration settings, evaluation rows, run facts)

RESULTS = Path(__file__).parent / "results" / "decomposition.json"
WORK = Path(tempfile.gettempdir()) / "moekit-decomposition"
STATISTICS = {"frequency", "reap", "mean_output", "hidden_sample"}
KEEP = (0.75, 0.5)


def configs(keep: float) -> dict[str, dict]:
    """label -> one recipe step, keeping ``keep`` of the routed-expert parameters."""
    out = {}
    for method in ("svd", "shared_basis"):
        for refit in (False, True):
            out[f"{method}{' + refit' if refit else ''}"] = {"type": "decompose", "method": method,
                                                             "keep_params": keep, "refit": refit}
    out["svd, gate-weighted whitening"] = {"type": "decompose", "method": "svd", "keep_params": keep,
                                           "weighting": "gate", "damp": 0.01}
    out["plain svd (not whitened)"] = {"type": "decompose", "method": "svd", "keep_params": keep, "whiten": False}
    out["svd, global budget"] = {"type": "decompose", "method": "svd", "keep_params": keep, "budget": "global"}
    out["REAP + refit"] = {"type": "prune", "method": "reap", "remove": round(1 - keep, 2), "refit": True}
    out["HC-SMoE + refit"] = {"type": "merge", "grouping": "hcsmoe", "router": "mean", "remove": round(1 - keep, 2),
                              "refit": True}
    return out


def calibrate(model_name: str, folder: Path) -> dict:
    from moekit.calib.calibrate import calibrate as run
    from moekit.data.tokens import calibration_tokens
    from moekit.io.tokenizer import tokenizer_for
    from moekit.io.load import load

    tokens = calibration_tokens("stdlib:calib", tokenizer_for(model_name), **base.CALIB)
    start = time.perf_counter()
    run(load(model_name), tokens.input_ids, statistics=STATISTICS, hidden_sample=8192, progress=False,
        meta=tokens.describe()).save(folder)
    return {"seconds": round(time.perf_counter() - start, 2), "tokens": tokens.input_ids.numel()}


def one_config(model_name: str, stats_dir: str, step: dict, eval_every: int, out: str) -> dict:
    """Runs in a child process: apply, round to the stored dtype, evaluate, save for timing."""
    import torch

    import moekit
    from moekit.calib.stats import CalibrationStats
    from moekit.io.load import stored_dtype
    from moekit.io.save import atomic_dir, round_for_storage, write_checkpoint
    from moekit.recipe import Recipe
    from moekit.train.evaluate import evaluate

    torch.set_num_threads(1)
    model = moekit.load(model_name)
    stats = CalibrationStats.load(stats_dir, model=model)
    start = time.perf_counter()
    report = Recipe.from_dict({"steps": [step]}).steps[0].apply(model, stats) if step else {}
    seconds = time.perf_counter() - start
    stored = stored_dtype(model_name)
    round_for_storage(model, stored)
    result = evaluate(model, base.eval_rows(model_name, eval_every), batch_size=16)
    size = moekit.summarize(model, stored_dtype=stored)
    with atomic_dir(out) as folder:
        write_checkpoint(model, folder)
    errors = report.get("relative_error") or {}
    return {"perplexity": result.perplexity, "accuracy": result.accuracy, "tokens": result.tokens,
            "step_seconds": round(seconds, 2), "routed_params": size.routed_params, "total_params": size.total_params,
            "active_params": size.active_params, "bytes": size.total_bytes,
            "relative_error": errors, "refit": report.get("refit"),
            "peak_memory_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def run_child(*args) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from decomposition import one_config; print(json.dumps(one_config(*{args!r})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_model(model_name: str, results: dict, eval_every: int, runs: int, only: list[str] | None = None) -> None:
    on_disk = json.loads(RESULTS.read_text())["models"] if RESULTS.is_file() else {}
    entry = results["models"].setdefault(model_name, on_disk.get(model_name, {"rows": {}}))
    folders = {}
    with tempfile.TemporaryDirectory() as tmp:
        stats_dir = Path(tmp) / "stats"
        work = WORK / Path(model_name).name
        todo = {"original": {}} | {f"{keep:.0%} {label}": step for keep in KEEP for label, step in configs(keep).items()}
        for name, step in todo.items():
            folders[name] = work / name.replace(" ", "_").replace("%", "").replace("(", "").replace(")", "")
            if name in entry["rows"] and (folders[name].is_dir() or only and name.partition(" ")[2] not in only):
                continue
            if not stats_dir.exists():
                entry["calibration"] = calibrate(model_name, stats_dir)
            if folders[name].exists():
                import shutil

                shutil.rmtree(folders[name])
            entry["rows"][name] = {"step": step, **run_child(model_name, str(stats_dir), step, eval_every,
                                                             str(folders[name]))}
            entry["run"] = base.run_facts(1)
            save(results)
            print(model_name, name, round(entry["rows"][name]["perplexity"], 3), flush=True)
    if runs and any("decode_tokens_per_s" not in row for row in entry["rows"].values()):
        import moekit
        from dynamic import speeds

        loaded = {name: moekit.load(str(folder)) for name, folder in folders.items()}
        for name, timing in speeds({n: (lambda m=m: m) for n, m in loaded.items()}, runs).items():
            entry["rows"][name].update({k: timing[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s",
                                                               "threads")})
        entry["speed_run"] = base.run_facts(1)
        save(results)


def layer_speed(runs: int) -> dict:
    """Speed only, at a big model's shapes: one layer of Qwen3-30B-A3B's routed experts (128 of
    width 768, hidden 2048, top-8; random weights, fp32) through transformers' default
    experts forward (grouped_mm) and through `FactoredExperts` at 75% and 50% of the
    parameters (ranks spread evenly), for a decode step (1 token) and a prefill (512 tokens),
    timed round-robin, median of ``runs``."""
    import statistics

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import moekit
    from moekit.arch.factored import FactoredExperts

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen3_moe", hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                                  num_experts_per_tok=8, num_hidden_layers=1, num_attention_heads=32,
                                  num_key_value_heads=4, vocab_size=256, norm_topk_prob=True)
    layer = moekit.moe_layers(AutoModelForCausalLM.from_config(config))[0]
    E, H, I = layer.num_experts, layer.experts.hidden_size, layer.experts.intermediate_size
    modules = {"original": layer.experts.module}
    for keep in KEEP:
        ranks = [int(keep * out * inp / (out + inp)) for out, inp in ((2 * I, H), (H, I))]
        module = FactoredExperts(num_experts=E, hidden_size=H, intermediate_size=I, gate_up_ranks=[ranks[0]] * E,
                                 down_ranks=[ranks[1]] * E, base=False, act_fn=layer.experts.activation)
        for p in module.parameters():
            torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
        modules[f"svd {keep:.0%}"] = module
    out = {"shapes": "hidden 2048, 128 experts of width 768, top-8 (Qwen3-30B-A3B)", "runs": runs}
    for tokens in (1, 512):
        hidden = torch.randn(tokens, H)
        index = torch.stack([torch.randperm(E)[:8] for _ in range(tokens)])
        weights = torch.rand(tokens, 8)
        times: dict[str, list[float]] = {name: [] for name in modules}
        for round_ in range(runs + 1):
            for name, module in modules.items():
                start = time.perf_counter()
                with torch.no_grad():
                    for _ in range(20 if tokens == 1 else 1):
                        module(hidden, index, weights)
                if round_:
                    times[name].append((time.perf_counter() - start) / (20 if tokens == 1 else 1))
        out[f"{tokens} tokens"] = {name: round(statistics.median(t) * 1000, 3) for name, t in times.items()}
    out["run"] = base.run_facts(1)
    return out


def save(results: dict) -> None:
    """Merge into what is on disk (two models may run in two processes)."""
    on_disk = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    models = {**on_disk.get("models", {}), **results["models"]}
    RESULTS.write_text(json.dumps({**on_disk, **results, "models": models}, indent=1) + "\n")


def render(results: dict) -> str:
    lines = []
    for model_name, entry in results["models"].items():
        rows = entry["rows"]
        original = rows["original"]
        lines += [f"\n{model_name} (perplexity {original['perplexity']:.3f}, accuracy {original['accuracy']:.2%}, "
                  f"{original['routed_params']:,} routed parameters; {entry['run']['machine']}, {entry['run']['date']})",
                  "", "| kept | method | routed params | bytes (MiB) | Δ ppl | Δ / Δ REAP+refit | accuracy | step s | "
                  "prefill tok/s | decode tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in rows.items():
            kept = name.split()[0] if name != "original" else "100%"
            reap = rows.get(f"{kept} REAP + refit")
            delta = row["perplexity"] - original["perplexity"]
            ratio = f"{delta / (reap['perplexity'] - original['perplexity']):.2f}" if reap else "—"
            speed = [f"{row[k]:.0f}" if k in row else "—" for k in ("prefill_tokens_per_s", "decode_tokens_per_s")]
            lines.append(f"| {kept} | {name.partition(' ')[2] if name != 'original' else 'original'} | "
                         f"{row['routed_params']:,} | {row['bytes'] / 2**20:.1f} | {delta:+.3f} | {ratio} | "
                         f"{row['accuracy']:.2%} | {row['step_seconds']:.1f} | {speed[0]} | {speed[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["moekit/ref-fine", "moekit/ref-coarse"])
    parser.add_argument("--eval-every", type=int, default=4, help="evaluate on every N-th 256-token row")
    parser.add_argument("--runs", type=int, default=3, help="timed generations per model (0: no speed)")
    parser.add_argument("--render", action="store_true", help="print the tables of the results and exit")
    parser.add_argument("--layer-speed", action="store_true", help="time one layer at Qwen3-30B-A3B's shapes only")
    parser.add_argument("--only", nargs="+", help="run these configurations (labels without the share kept) and "
                        "keep the other rows as they are")
    args = parser.parse_args()
    if args.layer_speed:
        import torch

        torch.set_num_threads(1)
        results = {"models": {}, "layer_speed_ms": layer_speed(max(args.runs, 1))}
        save(results)
        print(json.dumps(results["layer_speed_ms"], indent=1))
        return
    if args.render:
        print(render(json.loads(RESULTS.read_text())))
        return
    results = {"calibration": base.CALIB, "hidden_sample": 8192, "eval_every": args.eval_every, "models": {}}
    for model_name in args.models:
        run_model(model_name, results, args.eval_every, args.runs, args.only)
    print(render(results))


if __name__ == "__main__":
    main()
