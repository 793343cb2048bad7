"""Peak memory of `moekit.calibrate` as the model gets deeper.

Each measurement runs in a fresh process: build a Qwen3-MoE whose weights are small and
whose activations are large, then record the process's peak resident memory above what
it held just before calibrating. For comparison the same process shape runs a forward
that keeps every layer's hidden states (``output_hidden_states=True``), which is what a
calibration holding "the whole model's activations at once" costs.

    python benchmarks/calibration_memory.py            # writes benchmarks/results/calibration_memory.json
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
from datetime import date
from pathlib import Path

SIZES = dict(hidden=256, samples=32, seq_len=512)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def measure(layers: int, mode: str, hidden: int, samples: int, seq_len: int) -> dict:
    """Run in a child process; returns peak MiB above the pre-run baseline."""
    import torch
    from transformers import AutoModelForCausalLM

    from moekit.calib.calibrate import calibrate
    from moekit.zoo.tiny import randomize_, tiny_config

    torch.set_num_threads(1)
    config = tiny_config("qwen3_moe")
    config.update(dict(num_hidden_layers=layers, hidden_size=hidden, head_dim=hidden // 4, intermediate_size=64,
                       moe_intermediate_size=32, mlp_only_layers=[], max_position_embeddings=seq_len,
                       vocab_size=128))
    model = randomize_(AutoModelForCausalLM.from_config(config)).eval()
    ids = torch.randint(3, 128, (samples, seq_len), generator=torch.Generator().manual_seed(0))
    weights_mib = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    baseline = _rss_kib()
    if mode == "moekit":
        calibrate(model, ids, statistics=["frequency", "reap"], batch_size=4, progress=False)
    else:
        with torch.no_grad():
            model.model(ids, output_hidden_states=True).hidden_states
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"layers": layers, "mode": mode, "peak_above_baseline_mib": round((peak - baseline) / 1024, 1),
            "weights_mib": round(weights_mib, 1)}


def run(depths=(2, 8, 32), modes=("moekit", "all hidden states"), **sizes) -> list[dict]:
    sizes = {**SIZES, **sizes}
    rows = []
    for mode in modes:
        for layers in depths:
            code = (f"import json,sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    f"from calibration_memory import measure; "
                    f"print(json.dumps(measure({layers}, {mode!r}, **{sizes!r})))")
            out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    rows = run()
    hidden_copy = SIZES["samples"] * SIZES["seq_len"] * SIZES["hidden"] * 4 / 2**20
    result = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, 1 thread", "date": str(date.today()),
              "sizes": SIZES, "one_copy_of_all_hidden_states_mib": round(hidden_copy, 1), "rows": rows}
    out = Path(__file__).parent / "results" / "calibration_memory.json"
    out.write_text(json.dumps(result, indent=2))
    print("| mode | layers | peak above baseline (MiB) | weights (MiB) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['layers']} | {r['peak_above_baseline_mib']} | {r['weights_mib']} |")
    print(f"\none copy of all samples' hidden states: {hidden_copy:.1f} MiB; {result['machine']}; {result['date']}")


if __name__ == "__main__":
    main()
