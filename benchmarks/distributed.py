"""Benchmark of calibration across torch.distributed ranks (issue 19), and a scaling model.

Runs `moekit.calibrate` on one model with 1 and 2 gloo ranks, each launched by `torchrun`
(one torch thread per rank), with two sets of statistics: the CLI's default set (sums and
Gram matrices only) and what `prune-50` calibrates (REAP and a hidden sample of 8,192
states per layer). For each run it records the wall time of the whole launch, the time of
the calibration pass (from the first captured batch to the combined statistics of the
last layer, on the slowest rank), and per rank the bytes handed to collectives and the seconds spent in
them (waiting for the other rank included), per MoE layer. The machine's load average
before and after each run is kept: on a shared machine two ranks compete with other jobs
for the same cores. Results go to benchmarks/results/distributed.json; --render prints
the markdown of BENCHMARKS.md, with the scaling model for Qwen3-235B-A22B (`scaling`).

    python benchmarks/distributed.py                        # moekit/ref-fine, 64 x 256 tokens
    python benchmarks/distributed.py --repeat 3             # best of 3 per configuration
    python benchmarks/synthetic.py /tmp/s24-narrow --layers 24 --hidden 256 --experts 32 --expert-width 96 --top-k 4
    python benchmarks/distributed.py --model /tmp/s24-narrow --name "synthetic 24 layers (ref-fine's widths)"
    python benchmarks/distributed.py --render
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "distributed.json"
STATISTICS = {  # name -> (statistics, hidden sample)
    "CLI default": ("frequency,soft_frequency,reap,ean,man,msan,peak,coactivation,logit_similarity", 0),
    "prune-50's": ("frequency,reap", 8192),
}


def child(args) -> None:
    """One rank (run by torchrun): calibrate, then rank 0 prints the measurements as JSON."""
    import torch

    torch.set_num_threads(1)
    import moekit.distributed as distributed
    from moekit.calib.calibrate import calibrate
    from moekit.data.tokens import calibration_tokens
    from moekit.io.tokenizer import tokenizer_for
    from moekit.distributed.collectives import gather_objects
    from moekit.io.load import open_model

    world = distributed.init()
    tokens = calibration_tokens("stdlib:calib", tokenizer_for(args.model), n_samples=args.samples,
                                seq_len=args.seq_len, seed=0).input_ids
    lent = open_model(args.model)
    statistics, sample = STATISTICS[args.stats]
    start = time.perf_counter()
    stats = calibrate(lent, tokens, statistics=statistics.split(",") + (["hidden_sample"] if sample else []),
                      hidden_sample=sample, batch_size=8, progress=False)
    seconds = time.perf_counter() - start
    layers = len(stats.layers)
    mine = {"pass_s": seconds, "bytes_per_layer": distributed.traffic["bytes"] / layers,
            "collective_s_per_layer": distributed.traffic["seconds"] / layers,
            "calls_per_layer": distributed.traffic["calls"] / layers}
    ranks = gather_objects(mine, world, "benchmark") if world is not None else [mine]
    if world is None or world.main:
        print(json.dumps({"moe_layers": layers, "tokens": int(tokens.numel()), "ranks": ranks}))
    distributed.finish()


def launch(args, world: int, stats: str) -> dict:
    """One torchrun launch of this script's child mode; its wall time and the load around it."""
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc-per-node", str(world), "--master-port", str(29600 + world), __file__,
               "--child", "--model", args.model, "--stats", stats, "--samples", str(args.samples),
               "--seq-len", str(args.seq_len)]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
    return {"world": world, "stats": stats, "wall_s": round(wall, 2), "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2), **json.loads(run.stdout.strip().splitlines()[-1])}


def measure(args) -> None:
    runs = []
    for _ in range(args.repeat):
        for stats in STATISTICS:
            for world in (1, 2):
                runs.append(launch(args, world, stats))
                print(json.dumps(runs[-1]), flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    everything = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    everything[args.name or args.model] = {"model": args.model, "samples": args.samples, "seq_len": args.seq_len,
                                           "date": time.strftime("%Y-%m-%d"),
                                           "machine": "x86_64, 2 cores, 24 GiB, shared", "runs": runs}
    RESULTS.write_text(json.dumps(everything, indent=1))


# -- the scaling model --------------------------------------------------------------------
# Qwen3-235B-A22B (its config.json): 94 decoder layers, hidden 4096, 128 experts of width 1536,
# top-8, attention 64 query / 4 key-value heads of 128.
QWEN3_235B = {"layers": 94, "hidden": 4096, "experts": 128, "width": 1536, "top_k": 8, "q": 64 * 128, "kv": 4 * 128}
ASSUMED = {  # not measured here: stated so that anyone can put in their own machine's figures
    "gpu_flops": 400e12,     # bf16 FLOP/s one H100 sustains on these matmuls (~40% of its 990 TFLOP/s peak)
    "read_bytes_s": 5e9,     # one node's NVMe read rate; each node reads every layer once (page cache for its ranks)
    "pcie_bytes_s": 25e9,    # host <-> GPU per GPU: the rows' hidden states live in CPU memory between layers
    "intra_bytes_s": 150e9,  # NVLink all-gather bus bandwidth per GPU, within a node
    "inter_bytes_s": 25e9,   # 200 Gb/s InfiniBand per GPU, between nodes
    "latency_s": 50e-6,      # per collective call
}


ROUTED = {"reap", "ean", "man", "msan", "peak"}  # one batch of routed outputs gives all four sums of these


def sum_bytes(statistics: str, experts: int) -> int:
    """Bytes of one layer's float64 sums (`moekit.calib.observers.LayerAccumulator.sums`):
    [E] vectors (frequency, soft_frequency; reap, ean, msan and peak together), [E, E]
    Gram matrices (coactivation, logit_similarity), and the token count."""
    names = set(statistics.split(","))
    vectors = 1 + ("soft_frequency" in names) + 4 * bool(names & ROUTED)
    grams = ("coactivation" in names) + ("logit_similarity" in names)
    return 8 * (vectors * experts + grams * experts * experts + 1)


def layer_figures(m: dict, statistics: str, sample: int, ranks: int) -> dict:
    """Per decoder layer: bytes of weights (bf16), FLOPs per calibration token, and the
    bytes of the collectives: sums (all-reduce) and the hidden sample (the keys of every
    rank's candidates, then one sample of states: `moekit.distributed.statistics`)."""
    h, e, w, k = m["hidden"], m["experts"], m["width"], m["top_k"]
    attention = h * m["q"] * 2 + h * m["kv"] * 2
    expert = 3 * h * w
    weights = (attention + e * expert + e * h) * 2
    flops = 2 * (attention + k * expert + e * h)
    return {"weights": weights, "flops_per_token": flops, "sum_bytes": sum_bytes(statistics, e),
            "sample_bytes": sample * (h * 4 + 8) + ranks * sample * 8 if sample else 0}


def scaling(tokens: int, gpus: int, statistics: str, sample: int, per_node: int = 8) -> dict:
    """Seconds of one calibration pass of Qwen3-235B over ``tokens`` tokens on ``gpus`` GPUs:
    per layer, read (per node, not divided) + (compute + moving the rows' hidden states to
    the GPU and back, bf16) / gpus + exchange; no overlap between them (moekit reads a
    layer, then pushes the rows through it, then combines its statistics). Observers' own
    arithmetic and attention scores (short rows) are left out: they add to compute."""
    f, a = layer_figures(QWEN3_235B, statistics, sample, gpus), ASSUMED
    read = f["weights"] / a["read_bytes_s"]
    compute = tokens * f["flops_per_token"] / a["gpu_flops"] / gpus
    transfer = 2 * tokens * QWEN3_235B["hidden"] * 2 / a["pcie_bytes_s"] / gpus
    bandwidth = a["intra_bytes_s"] if gpus <= per_node else a["inter_bytes_s"]
    # a ring all-reduce moves about twice its bytes through each rank, an all-gather once
    exchange = 0.0 if gpus == 1 else (2 * f["sum_bytes"] + f["sample_bytes"]) / bandwidth + 8 * a["latency_s"]
    per_layer = read + compute + transfer + exchange
    return {"read_s": read, "compute_s": compute, "transfer_s": transfer, "exchange_s": exchange,
            "pass_s": per_layer * QWEN3_235B["layers"]}


def render() -> None:
    for name, data in json.loads(RESULTS.read_text()).items():
        print(f"{name}: {data['model']}, {data['samples']} x {data['seq_len']} tokens, {data['machine']}, "
              f"{data['date']}\n")
        render_runs(data)
    render_model()


def render_runs(data: dict) -> None:
    print("| statistics | ranks | launch wall (s) | calibration pass (s) | speed-up of the pass | bytes exchanged per "
          "MoE layer and rank | in collectives per layer (s) | load average before → after |")
    print("|---|---|---|---|---|---|---|---|")
    best: dict[tuple[str, int], dict] = {}
    for run in data["runs"]:  # the best of the repeats; a pass lasts until its slowest rank is done
        key = (run["stats"], run["world"])
        if key not in best or _pass(run) < _pass(best[key]):
            best[key] = run
    for (stats, world), run in sorted(best.items()):
        one = best.get((stats, 1))
        speedup = _pass(one) / _pass(run) if one else float("nan")
        exchanged = ", ".join(f"{r['bytes_per_layer']:,.0f}" for r in run["ranks"])
        waited = ", ".join(f"{r['collective_s_per_layer']:.3f}" for r in run["ranks"])
        print(f"| {stats} | {world} | {run['wall_s']:.1f} | {_pass(run):.2f} | {speedup:.2f}x | "
              f"{exchanged} | {waited} | {run['load_before']} → {run['load_after']} |")
    print()


def render_model() -> None:
    print("Scaling model, Qwen3-235B-A22B (seconds of one calibration pass; assumptions in `ASSUMED`):\n")
    print("| tokens | statistics | GPUs | read per layer | compute per layer | hidden states to and from the GPU "
          "per layer | exchange per layer | pass | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tokens in (16384, 1_048_576):
        for stats, (names, sample) in STATISTICS.items():
            base = scaling(tokens, 1, names, sample)["pass_s"]
            for gpus in (1, 8, 64):
                s = scaling(tokens, gpus, names, sample)
                print(f"| {tokens:,} | {stats} | {gpus} | {s['read_s']:.2f} | {s['compute_s']:.3f} | "
                      f"{s['transfer_s']:.3f} | {s['exchange_s']:.4f} | {s['pass_s']:.0f} | {base / s['pass_s']:.2f}x |")


def _pass(run: dict) -> float:
    return max(r["pass_s"] for r in run["ranks"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="moekit/ref-fine")
    parser.add_argument("--name", help="the results' name (default: the model)")
    parser.add_argument("--stats", default="CLI default", choices=sorted(STATISTICS))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--render", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args)
    elif args.render:
        render()
    else:
        measure(args)


if __name__ == "__main__":
    main()
