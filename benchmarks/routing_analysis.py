"""What the reference models' routers learned: `moekit analyze` on both, with three corpora.

    python benchmarks/routing_analysis.py [--samples 64] [--seq-len 256] [--candidates 8]

Corpora: the stdlib eval split (what the models were trained on: Python source), and two
local corpora `benchmarks/corpora.py` renders (man pages, /usr/share/doc text; eval
splits). Each model is analysed in a fresh process (`--one`), so its time and peak
memory (VmHWM from /proc/self/status, the process's own high-water mark) are its own;
attribution is measured on the stdlib split. Then the two analyses are compared on the
same tokens (the models share a tokenizer). Writes benchmarks/results/routing_analysis.json,
one figure for docs/analysis.md (benchmarks/results/routing_analysis_tokens.png), the reports
under /tmp/moekit-routing-analysis/, and prints a Markdown summary of the findings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "routing_analysis.json"
FIGURE = ROOT / "results" / "routing_analysis_tokens.png"
WORK = Path("/tmp/moekit-routing-analysis")
MODELS = ["moekit/ref-fine", "moekit/ref-coarse"]


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def corpora() -> dict[str, str]:
    sys.path.insert(0, str(ROOT))
    from corpora import corpus

    return {"stdlib": "stdlib:eval", "man": str(corpus("man", "eval")), "docs": str(corpus("docs", "eval"))}


def one(model: str, out: Path, samples: int, seq_len: int, candidates: int) -> dict:
    """Analyse ``model`` in this process; returns timings, peak memory and the summary."""
    import torch

    from moekit.analyze import analyze
    from moekit.analyze.report import write
    from moekit.analyze.run import corpus_rows
    from moekit.io.tokenizer import tokenizer_for
    from moekit.io.load import open_model

    torch.set_num_threads(1)
    start = time.perf_counter()
    tokenizer = tokenizer_for(model)
    specs = corpora()
    rows = {name: corpus_rows(spec, tokenizer, samples=samples, seq_len=seq_len) for name, spec in specs.items()}
    tokenized = time.perf_counter()
    result = analyze(open_model(model), rows, focus="stdlib", candidates=candidates, name=model,
                     decode=lambda i: tokenizer.decode([i]), progress=False)
    analysed = time.perf_counter()
    write(out, [result])
    written = time.perf_counter()
    return {"model": model, "corpora": specs, "tokens": result.meta["tokens"],
            "seconds": {"tokenize": round(tokenized - start, 2), "analyze": round(analysed - tokenized, 2),
                        "report": round(written - analysed, 2)},
            "analysis_seconds_inside": result.meta["seconds"], "peak_rss_mib": round(_vm_hwm_mib(), 1),
            "report": str(out)}


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def findings(runs: list[dict], analyses: list, comparison: dict) -> str:
    lines = ["| | " + " | ".join(r["model"] for r in runs) + " |", "|---|" + "---|" * len(runs)]

    def row(label, values):
        lines.append(f"| {label} | " + " | ".join(values) + " |")

    s = [a.summary for a in analyses]
    row("experts × top-k", [f"{a.layers[0]['num_experts']} × {a.layers[0]['top_k']}" for a in analyses])
    row("router entropy / log E (mean over layers)", [f"{x['entropy_normalized']:.3f}" for x in s])
    row("load max/mean (mean over layers)", [f"{x['imbalance']:.2f}" for x in s])
    row("dead / near-dead experts", [f"{x['dead_experts']} / {x['near_dead_experts']}" for x in s])
    row("token-id lookup agreement, held out (OpenMoE)", [_pct(x["token_lookup_agreement"]) for x in s])
    row("  baseline: the k most loaded experts", [_pct(x["token_static_agreement"]) for x in s])
    row("frequent-token concentration (k/E if uniform)",
        [f"{x['token_concentration']:.3f} ({a.layers[0]['top_k'] / a.layers[0]['num_experts']:.3f})"
         for x, a in zip(s, analyses)])
    row("one-step prefetch recall@k (next layer's router)", [_pct(x["prefetch_recall"]) for x in s])
    row("  baseline: the k most loaded experts", [_pct(x["prefetch_static_recall"]) for x in s])
    row("MI with the previous layer / min entropy", [f"{x['mutual_information_normalized']:.3f}" for x in s])
    row("  the same, first-ranked experts only", [f"{x['mutual_information_top1_normalized']:.3f}" for x in s])
    row("largest position-bucket divergence (TV)", [f"{x['position_max_divergence']:.3f}" for x in s])
    for corpus in analyses[0].summary.get("specific_experts", {}):
        row(f"experts (layer × expert) specific to {corpus}: z > 1.96",
            [f"{x['specific_experts'][corpus]} of {sum(layer['num_experts'] for layer in a.layers)}"
             for x, a in zip(s, analyses)])
    row("time: tokenize / analyze / report (s)",
        [f"{r['seconds']['tokenize']} / {r['seconds']['analyze']} / {r['seconds']['report']}" for r in runs])
    row("peak resident memory (VmHWM, MiB)", [f"{r['peak_rss_mib']}" for r in runs])
    per_layer = []
    for a in analyses:
        att = a.attribution
        per_layer.append(f"- {a.model}, attribution on stdlib (base loss {att['loss']:.3f} nats): "
                         + "; ".join(f"layer {e['layer']} expert {e['expert']} {e['increase']:+.3f}"
                                     for e in att["experts"]))
        per_layer.append(f"- {a.model}, per layer: token-id lookup "
                         + ", ".join(f"L{layer['layer']} {_pct(layer['tokens']['lookup_agreement'])}"
                                     for layer in a.layers)
                         + "; prefetch recall@k "
                         + ", ".join(f"L{layer['layer']} {_pct(layer['from_previous']['prefetch_recall'])}"
                                     for layer in a.layers if "from_previous" in layer))
        pairs = a.layers[-1]["coactivation"]["top_pairs"][:3]
        per_layer.append("  - last layer, most coupled pairs: " + ", ".join(
            f"{p['experts'][0]} & {p['experts'][1]} (lift {p['lift']:.1f}, {p['together']} tokens)" for p in pairs))
        for corpus, experts in a.layers[-1]["domains"].get("specific", {}).items():
            per_layer.append(f"  - last layer, most {corpus}-specific experts: "
                             + (", ".join(f"{e['expert']} (z {e['z']:.1f}, {e['share']:.1%} of the corpus's selections)"
                                          for e in experts[:3]) or "none"))
    return "\n".join(lines + [""] + per_layer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], Path(args.one[1]), args.samples, args.seq_len, args.candidates)))
        return
    from moekit.analyze.compare import compare
    from moekit.analyze.report import read, write

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    runs = []
    for model in MODELS:
        out = WORK / model.split("/")[-1]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, __file__, "--one", model, str(out), "--samples", str(args.samples),
                               "--seq-len", str(args.seq_len), "--candidates", str(args.candidates)],
                              check=True, capture_output=True, text=True, env=env)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    analyses = [read(r["report"])[0][0] for r in runs]
    comparison = compare(analyses[0], analyses[1])
    write(WORK / "compare", analyses, comparison)
    shutil.copyfile(WORK / "ref-fine" / "figures" / "tokens.png", FIGURE)
    RESULTS.write_text(json.dumps({
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), 1 thread",
        "date": time.strftime("%Y-%m-%d"),
        "settings": {"samples": args.samples, "seq_len": args.seq_len, "candidates": args.candidates},
        "runs": runs,
        "summaries": {a.model: a.summary for a in analyses},
        "attribution": {a.model: a.attribution for a in analyses},
        "per_layer": {a.model: [{"layer": layer["layer"], "load": {k: layer["load"][k] for k in
                                                                   ("imbalance", "cv", "entropy_normalized", "dead",
                                                                    "near_dead")},
                                 "tokens": {k: layer["tokens"][k] for k in ("lookup_agreement", "static_agreement",
                                                                            "mean_concentration")},
                                 "from_previous": {k: v for k, v in layer.get("from_previous", {}).items()
                                                   if k not in ("joint", "transition")},
                                 "specific": layer["domains"].get("specific"),
                                 "top_pairs": layer["coactivation"]["top_pairs"][:5]}
                                for layer in a.layers] for a in analyses},
        "comparison": comparison,
    }, indent=1))
    print(findings(runs, analyses, comparison))
    print(f"\nwrote {RESULTS}, {FIGURE} and the reports under {WORK}")


if __name__ == "__main__":
    main()
