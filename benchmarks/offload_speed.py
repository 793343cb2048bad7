"""Offloaded inference, wall clock: moekit against transformers + accelerate's own offload
at the same memory budget, and the model fully in memory. On the CPU the slow tier is disk;
with ``--device cuda`` it is CPU memory (accelerate's CPU offload against moekit with and
without prefetch on a CUDA stream and misses computed on the CPU).

    python benchmarks/synthetic.py /tmp/offload-syn --layers 8 --hidden 1024 --experts 32 --expert-width 512 --top-k 4
    python benchmarks/offload_speed.py /tmp/offload-syn [--resident 0.25] [--new-tokens 16]
    python benchmarks/synthetic.py /tmp/s24 --preset s24          # 15.5 GB of bf16
    python benchmarks/offload_speed.py /tmp/s24 --expert-memory 2GB --kinds baseline,accelerate,moekit \
        --prompt-tokens 4 --new-tokens 5 --repeats 2 --out benchmarks/results/offload_speed-s24.json

Budget: ``--expert-memory`` bytes (or ``--resident`` of the routed experts in fp32) for
moekit's ``expert_memory`` (its experts cached in the checkpoint's bf16 and upcast per call
unless ``--cache-dtype float32``); for accelerate, ``max_memory={"cpu": that + every
non-expert weight in fp32}`` with an ``offload_folder`` (``device_map="auto"`` puts whole
decoder layers on disk when they do not fit). Each configuration runs in its own process,
so its peak RSS (VmHWM) is its own; ``baseline`` is a process that imports torch,
transformers and moekit and generates with a tiny model: the interpreter's share of every
other peak. A ``--prompt-tokens`` prompt is prefilled, then ``--new-tokens`` greedy tokens;
decode tokens/s is timed from the first new token to the last. On a GPU the model computes
in bf16, accelerate gets ``max_memory={0: budget + non-expert weights in bf16, "cpu": the
rest}``, and peak GPU memory is reported too. Configurations run
interleaved, ``--repeats`` rounds. A synthetic model's random weights route with no
locality: the worst case for every cache. Writes ``--out`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "offload_speed.json"
KINDS = ["baseline", "full", "accelerate", "moekit", "moekit-prefetch"]
GPU_KINDS = ["moekit-compute", "moekit-compute-prefetch"]  # misses computed on the CPU (--device cuda)


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return -1


def budgets(folder: str, resident: float, expert_memory: str | None = None, size: int = 4) -> tuple[int, int]:
    """(expert_memory, non-expert bytes at ``size`` bytes per value)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from moekit.runtime.offload import routed_expert_bytes

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in skeleton.parameters()) * size
    experts = routed_expert_bytes(config, torch.float32 if size == 4 else torch.bfloat16)
    from moekit.devices import parse_bytes

    return parse_bytes(expert_memory) if expert_memory else int(experts * resident), total - experts


def one(kind: str, folder: str, resident: float, new_tokens: int, expert_memory: str | None = None,
        prompt_tokens: int = 16, cache_dtype: str = "auto", device: str = "cpu") -> dict:
    import torch
    from transformers.generation.streamers import BaseStreamer

    gpu = device != "cpu"
    if not gpu:
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if gpu else torch.float32
    expert_memory, rest = budgets(folder, resident, expert_memory, size=dtype.itemsize)
    start = time.perf_counter()
    if kind == "baseline":
        import moekit

        model = moekit.load("moekit/tiny-qwen3_moe", dtype=dtype).to(device)
    elif kind == "full":
        import moekit

        model = moekit.load(folder, dtype=dtype).to(device)
    elif kind == "accelerate":
        from transformers import AutoModelForCausalLM

        if gpu:  # CPU offload: what does not fit the GPU budget stays in CPU memory
            model = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", dtype=dtype,
                                                         max_memory={0: expert_memory + rest, "cpu": "200GiB"})
        else:
            offload_folder = tempfile.mkdtemp(prefix="moekit-acc-")  # fp32 copies of what is offloaded: removed below
            atexit.register(shutil.rmtree, offload_folder, ignore_errors=True)
            model = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", dtype=torch.float32,
                                                         max_memory={"cpu": expert_memory + rest},
                                                         offload_folder=offload_folder)
    else:
        import moekit

        model = moekit.offload(folder, expert_memory=expert_memory, prefetch=kind.endswith("-prefetch"),
                               cache_dtype=cache_dtype, record_trace=False, device=device, dtype=dtype,
                               compute_misses="auto" if "compute" in kind else "never")
    load_s = time.perf_counter() - start

    class Times(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.randint(3, 120 if kind == "baseline" else 1000, (1, prompt_tokens),
                        generator=torch.Generator().manual_seed(0)).to(device)
    times = Times()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=times)
    new = times.times[1:]  # the first put is the prompt
    out = {"kind": kind, "load_s": load_s, "prefill_s": new[0] - start,
           "decode_tokens_per_s": (len(new) - 1) / (new[-1] - new[0]), "peak_rss_bytes": _vm_hwm(),
           "expert_memory": expert_memory, "non_expert_bytes": rest}
    if gpu:
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    if kind.startswith("moekit"):
        out.update(model.moekit_offload.as_dict(), cache_dtype=model.moekit_cache_dtype,
                   slots=sum(model.moekit_capacity.values()), slow_tier=model.moekit_slow_tier,
                   miss_cost=model.moekit_miss_cost.as_dict() if model.moekit_miss_cost else None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--resident", type=float, default=0.25)
    parser.add_argument("--expert-memory", help="a size (2GB); overrides --resident")
    parser.add_argument("--cache-dtype", default="auto")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--kinds", help=f"default: {','.join(KINDS)}, and on a GPU {','.join(GPU_KINDS)}")
    parser.add_argument("--device", default="cpu", help="cpu (disk tier) or cuda (CPU-memory tier)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", choices=KINDS + GPU_KINDS)
    args = parser.parse_args()
    kinds = args.kinds.split(",") if args.kinds else KINDS + (GPU_KINDS if args.device != "cpu" else [])
    common = ["--resident", str(args.resident), "--new-tokens", str(args.new_tokens), "--prompt-tokens",
              str(args.prompt_tokens), "--cache-dtype", args.cache_dtype, "--device", args.device,
              *(["--expert-memory", args.expert_memory] if args.expert_memory else [])]
    if args.one:
        print(json.dumps(one(args.one, args.folder, args.resident, args.new_tokens, args.expert_memory,
                             args.prompt_tokens, args.cache_dtype, args.device)))
        return
    runs = []
    threads = {"OMP_NUM_THREADS": "1"} if args.device == "cpu" else {}  # a GPU box's CPU computes misses
    for round_ in range(args.repeats):  # interleaved: the machine's load hits every kind alike
        for kind in kinds:
            done = subprocess.run([sys.executable, __file__, args.folder, *common, "--one", kind],
                                  capture_output=True, text=True, env={**os.environ, **threads})
            if done.returncode != 0:
                runs.append({"kind": kind, "round": round_, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                runs.append({**json.loads(done.stdout.strip().splitlines()[-1]), "round": round_})
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    config = json.loads(Path(args.folder, "config.json").read_text())
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() if args.device != "cpu" and shutil.which("nvidia-smi") else None
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores" + (f", {gpu}" if gpu else ""),
              "device": args.device, "date": datetime.date.today().isoformat(),
              "model": {k: config.get(k) for k in ("num_hidden_layers", "hidden_size", "num_experts", "num_local_experts",
                                                    "moe_intermediate_size", "num_experts_per_tok")},
              "resident": args.resident, "expert_memory": args.expert_memory, "cache_dtype": args.cache_dtype,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": runs}
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| run | load s | prefill s | decode tokens/s | peak RSS MiB | hit rate | MiB moved/token |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        if "error" in r:
            print(f"| {r['kind']} | failed: {r['error']} | | | | | |")
            continue
        hit = f"{r['hit_rate']:.1%}" if "hit_rate" in r else ""
        moved = f"{r['bytes_moved_per_token'] / 2**20:.1f}" if "bytes_moved_per_token" in r else ""
        print(f"| {r['kind']} | {r['load_s']:.1f} | {r['prefill_s']:.2f} | {r['decode_tokens_per_s']:.2f} | "
              f"{r['peak_rss_bytes'] / 2**20:.0f} | {hit} | {moved} |")


if __name__ == "__main__":
    main()
