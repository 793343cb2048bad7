"""Routed-expert compute on CPU: transformers' experts implementations against a per-expert
loop, for a prefill (512 tokens) and a decode (1 token) call.

    python benchmarks/expert_compute.py [--hidden 2048] [--width 768] [--experts 64] [--top-k 8] [--threads 1]

One Qwen3-MoE experts module (Qwen3-30B-A3B's expert shapes by default, half its experts),
random fp32 weights, random routing (softmax weights over a random top-k). Timed: the
module's forward under ``eager``, ``grouped_mm`` and ``batched_mm`` (skipped where it would
gather a weight copy per token–expert pair bigger than ``--gather-limit``), and
``MoELayer.routed_forward`` (tokens grouped by expert, one pair of matmuls per active
expert: moekit's reference forward), and ``grouped_mm`` with its grouped GEMMs replaced by
a loop of ``torch.mm`` over the experts' row blocks (``mm_loop``: is the CPU grouped GEMM
anything but that loop?). Best of ``--repeat`` runs after one warm-up (other jobs on the
machine only ever add time). All agree to fp32 rounding; which are bit for bit
``grouped_mm``'s is recorded (``equal_to_grouped_mm``). Writes
benchmarks/results/expert_compute.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "expert_compute.json"


def best_seconds(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _mm_loop(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = input.new_empty(input.shape[0], weight.shape[-1])
    start = 0
    for i, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(input[start:end], weight[i], out=out[start:end])
        start = end
    return out


@contextlib.contextmanager
def grouped_gemm_as_mm_loop():
    """transformers' grouped_mm forward with each grouped GEMM done by `_mm_loop`."""
    import transformers.integrations.moe as moe

    original = moe._grouped_mm
    moe._grouped_mm = lambda input, weight, offs: _mm_loop(input.to(weight.dtype), weight, offs)
    try:
        yield
    finally:
        moe._grouped_mm = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--gather-limit", type=float, default=4e9, help="bytes batched_mm may gather")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    import moekit

    config = Qwen3MoeConfig(hidden_size=args.hidden, moe_intermediate_size=args.width, num_experts=args.experts,
                            num_experts_per_tok=args.top_k, num_hidden_layers=1, intermediate_size=args.width,
                            vocab_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval()
    layer = moekit.moe_layers(model)[0]
    experts = layer.experts.module
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.02)
    expert_bytes = sum(p[0].numel() * 4 for p in experts.parameters())
    rows = []
    for case, tokens in (("prefill", 512), ("decode", 1)):
        g = torch.Generator().manual_seed(1)
        hidden = torch.randn(tokens, args.hidden, generator=g)
        logits = torch.randn(tokens, args.experts, generator=g)
        weights, index = torch.softmax(logits, -1).topk(args.top_k, dim=-1)
        outputs, result = {}, {"case": case, "tokens": tokens}
        for impl in ("eager", "grouped_mm", "batched_mm"):
            if impl == "batched_mm" and tokens * args.top_k * expert_bytes > args.gather_limit:
                result[impl] = None  # it gathers [T·k, 2I, H] weights: too big to run here
                continue
            config._experts_implementation = impl

            def call():
                with torch.no_grad():
                    outputs[impl] = experts(hidden, index, weights)

            result[impl] = best_seconds(call, args.repeat)

        def loop():
            with torch.no_grad():
                outputs["per_expert_loop"] = layer.routed_forward(hidden, index, weights)

        result["per_expert_loop"] = best_seconds(loop, args.repeat)

        def mm_loop():
            config._experts_implementation = "grouped_mm"
            with torch.no_grad(), grouped_gemm_as_mm_loop():
                outputs["mm_loop"] = experts(hidden, index, weights)

        result["mm_loop"] = best_seconds(mm_loop, args.repeat)
        reference = outputs["grouped_mm"]
        result["max_abs_diff"] = max(float((o - reference).abs().max()) for o in outputs.values())
        result["equal_to_grouped_mm"] = sorted(k for k, o in outputs.items() if torch.equal(o, reference))
        rows.append(result)
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "threads": args.threads, "hidden": args.hidden, "width": args.width,
              "experts": args.experts, "top_k": args.top_k, "rows": rows}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print("| call | eager ms | grouped_mm ms | batched_mm ms | per-expert loop ms | grouped_mm, GEMMs as mm loop ms "
          "| max abs diff | bit-equal to grouped_mm |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k] * 1e3:.2f}" if r[k] is not None else "not run (gathers too much)"
                 for k in ("eager", "grouped_mm", "batched_mm", "per_expert_loop", "mm_loop")]
        print(f"| {r['case']} ({r['tokens']} token{'s' if r['tokens'] > 1 else ''}) | " + " | ".join(cells)
              + f" | {r['max_abs_diff']:.1e} | {', '.join(r['equal_to_grouped_mm'])} |")


if __name__ == "__main__":
    main()
