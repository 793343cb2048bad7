"""Offloaded inference, machine-independent part: cache hit rate, misses and bytes moved per
token for each policy (LRU, LFU, frequency prior), with and without prefetch, at 12.5%,
25% and 50% of each layer's experts resident, on both reference models.

    python benchmarks/offload.py [--rows 64] [--seq-len 256] [--calib-samples 64]

Routing is real: the model runs over ``--rows`` rows of ``--seq-len`` tokens spread evenly
over the ``stdlib:eval`` split, and every MoE layer's top-k choice of every token is
recorded, with the prefetch guess for it (layer l+1's router applied to layer l's MoE
input, as `moekit.offload(prefetch=True)` guesses). The tokens are then replayed one at a
time, as decoding sees them (rows one after the other, the cache kept), through
`moekit.runtime.expert_cache.simulate` — the same cache code the runtime drives, whose
evictions tests check equal the runtime's. Slots per layer come from
`moekit.runtime.offload.allocate` as `moekit.offload` computes them for that budget (the
prior policy spreads them by calibration mass). The prior is the experts' selection
frequency from `moekit.calibrate` on ``stdlib:calib`` (not the eval split).

A budget below top-k experts per layer is refused by `moekit.offload`, so ref-coarse
(8 experts, top-2) has no 12.5% row. Bytes are the fp32 cache's (what `moekit run` counts
on CPU); a bf16 cache moves half. Writes benchmarks/results/offload.json and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "offload.json"
MODELS = ["moekit/ref-fine", "moekit/ref-coarse"]
FRACTIONS = [0.125, 0.25, 0.5]
POLICIES = ["lru", "lfu", "prior"]


def record_routing(model, input_ids):
    """({layer: [N, k] chosen experts}, {layer: [N, k] guess from the previous MoE layer}),
    N = rows × seq_len tokens in row-major order (the order decoding would see them)."""
    import torch

    import moekit

    layers = moekit.moe_layers(model)
    chosen: dict[int, list] = {L.index: [] for L in layers}
    guessed: dict[int, list] = {L.index: [] for L in layers[1:]}
    handles = []
    for layer in layers:
        handles.append(layer.experts.module.register_forward_pre_hook(
            lambda _m, args, i=layer.index: chosen[i].append(args[1].clone())))
    for layer, nxt in zip(layers, layers[1:]):
        def guess(_m, args, router=nxt.router, i=nxt.index):
            hidden = args[0].reshape(-1, args[0].shape[-1])
            guessed[i].append(router.route(router.logits(hidden))[0])
        handles.append(layer.block.register_forward_pre_hook(guess))
    with torch.no_grad():
        for row in input_ids:  # one row per forward: the hooks see rows in order
            model(row[None])
    for handle in handles:
        handle.remove()
    return ({i: torch.cat(v) for i, v in chosen.items()}, {i: torch.cat(v) for i, v in guessed.items()})


def decode_trace(chosen, guessed, prefetch: bool):
    """Events for `simulate`: per token, per layer, the prefetch guess then the request."""
    order = sorted(chosen)
    chosen = {i: chosen[i].tolist() for i in order}
    guessed = {i: guessed[i].tolist() for i in guessed}
    trace = []
    for n in range(len(chosen[order[0]])):
        for i in order:
            if prefetch and i in guessed:
                trace.append(("prefetch", i, sorted(set(guessed[i][n]))))
            trace.append(("demand", i, sorted(set(chosen[i][n]))))
    return trace


def prefetch_quality(chosen, guessed) -> dict:
    predicted = correct = needed = 0
    for i, guess in guessed.items():
        for g, c in zip(guess.tolist(), chosen[i].tolist()):
            g, c = set(g), set(c)
            predicted, correct, needed = predicted + len(g), correct + len(g & c), needed + len(c)
    return {"precision": correct / predicted, "recall": correct / needed}


def one_model(name: str, rows: int, seq_len: int, calib_samples: int) -> dict:
    import torch

    import moekit
    from moekit.data.tokens import calibration_tokens, evaluation_stream
    from moekit.io.tokenizer import tokenizer_for
    from moekit.runtime.expert_cache import simulate
    from moekit.runtime.offload_budget import allocate

    torch.set_num_threads(1)
    tokenizer = tokenizer_for(name)
    model = moekit.load(name)
    layers = moekit.moe_layers(model)
    stream = evaluation_stream("stdlib:eval", tokenizer).input_ids
    starts = torch.linspace(0, stream.numel() - seq_len, rows).long()
    input_ids = torch.stack([stream[s:s + seq_len] for s in starts])
    start = time.perf_counter()
    chosen, guessed = record_routing(model, input_ids)
    calib = calibration_tokens("stdlib:calib", tokenizer, n_samples=calib_samples, seq_len=seq_len)
    stats = moekit.calibrate(model, calib.input_ids, statistics=("frequency",), progress=False)
    prior = {L.index: stats[L.index]["frequency"].double().tolist() for L in layers}
    experts = {L.index: L.num_experts for L in layers}
    top_k = {L.index: L.top_k for L in layers}
    sizes = {L.index: sum(p[0].numel() for p in L.experts.module.parameters(recurse=False)
                          if p.shape[0] == L.num_experts) * 4 for L in layers}
    tokens = rows * seq_len
    traces = {p: decode_trace(chosen, guessed, p) for p in (False, True)}
    results = []
    for fraction in FRACTIONS:
        budget = sum(round(fraction * experts[i]) * sizes[i] for i in experts)
        if any(round(fraction * experts[i]) < top_k[i] for i in experts):
            results.append({"fraction": fraction, "refused": "below top-k experts per layer"})
            continue
        for policy in POLICIES:
            capacity = allocate(budget, experts, top_k, sizes, prior if policy == "prior" else None)
            for prefetch in (False, True):
                sim = simulate(traces[prefetch], capacity, policy, num_experts=experts, prior=prior,
                               top_k=top_k)
                misses = sum(sim.misses.values())
                loads = misses + sum(sim.prefetch_loads.values())
                moved = sum((sim.misses.get(i, 0) + sim.prefetch_loads.get(i, 0)) * sizes[i] for i in experts)
                results.append({"fraction": fraction, "policy": policy, "prefetch": prefetch, "slots": capacity,
                                "hit_rate": sim.hit_rate, "misses_per_token": misses / tokens,
                                "loads_per_token": loads / tokens, "bytes_moved_per_token": moved / tokens})
    return {"model": name, "tokens": tokens, "expert_bytes_fp32": sizes[layers[0].index],
            "prefetch": prefetch_quality(chosen, guessed), "seconds": time.perf_counter() - start,
            "results": results}


def markdown(report: dict) -> str:
    lines = []
    for entry in report["models"]:
        q = entry["prefetch"]
        lines.append(f"\n{entry['model']} — {entry['tokens']:,} eval tokens, one expert = "
                     f"{entry['expert_bytes_fp32'] / 2**10:.0f} KiB (fp32); prefetch precision "
                     f"{q['precision']:.1%}, recall {q['recall']:.1%}\n")
        lines.append("| resident | policy | hit rate | misses/token | + prefetch: hit rate | misses/token | "
                     "loads/token | KiB moved/token (no prefetch / prefetch) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        rows = {}
        for r in entry["results"]:
            if "refused" in r:
                lines.append(f"| {r['fraction']:.1%} | refused: {r['refused']} | | | | | | |")
                continue
            rows[(r["fraction"], r["policy"], r["prefetch"])] = r
        for (fraction, policy, prefetch), r in rows.items():
            if prefetch:
                continue
            p = rows[(fraction, policy, True)]
            lines.append(f"| {fraction:.1%} | {policy} | {r['hit_rate']:.1%} | {r['misses_per_token']:.2f} | "
                         f"{p['hit_rate']:.1%} | {p['misses_per_token']:.2f} | {p['loads_per_token']:.2f} | "
                         f"{r['bytes_moved_per_token'] / 2**10:.0f} / {p['bytes_moved_per_token'] / 2**10:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-samples", type=int, default=64)
    args = parser.parse_args()
    report = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
              "date": datetime.date.today().isoformat(), "rows": args.rows, "seq_len": args.seq_len,
              "models": [one_model(m, args.rows, args.seq_len, args.calib_samples) for m in MODELS]}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
