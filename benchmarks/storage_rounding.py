"""How much does saving in bf16 change a compressed model's perplexity? `moekit compress`
saves in the source checkpoint's dtype (bf16 for the reference models) and
`compression.py` scores those rounded weights. This compares the fp32 weights right after
the edit with the bf16 weights as saved, on the steps whose new weights are not already
bf16 values (refitted and merged experts; plain pruning only drops experts, so rounding
changes nothing), 50% removed, on both reference models, with `compression.py`'s
calibration and evaluation rows.

    python benchmarks/storage_rounding.py      # writes results/storage_rounding.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from compression import calibrate_once, commit, eval_rows, label, machine  # noqa: E402

STEPS = [{"type": "prune", "method": "reap", "remove": 0.5, "budget": "uniform", "refit": True},
         {"type": "merge", "grouping": "hcsmoe", "router": "mean", "remove": 0.5, "refit": True}]


def main() -> None:
    from moekit.calib.stats import CalibrationStats
    from moekit.io.load import load, stored_dtype
    from moekit.io.save import round_for_storage
    from moekit.recipe import Recipe
    from moekit.train.evaluate import evaluate

    torch.set_num_threads(1)
    results = {"machine": machine(1), "date": str(date.today()), "commit": commit(), "rows": []}
    for model_name in ["moekit/ref-fine", "moekit/ref-coarse"]:
        with tempfile.TemporaryDirectory() as tmp:
            calibrate_once(model_name, Path(tmp) / "stats")
            rows = eval_rows(model_name, 4)
            for step in STEPS:
                model = load(model_name)
                stats = CalibrationStats.load(str(Path(tmp) / "stats"), model=model)
                Recipe.from_dict({"steps": [step]}).steps[0].apply(model, stats)
                fp32 = evaluate(model, rows, batch_size=16).perplexity
                round_for_storage(model, stored_dtype(model_name))
                bf16 = evaluate(model, rows, batch_size=16).perplexity
                row = {"model": model_name, "config": label(step), "remove": 0.5, "fp32": fp32, "bf16": bf16}
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
    out = Path(__file__).parent / "results" / "storage_rounding.json"
    out.write_text(json.dumps(results, indent=1))
    print("| model | step (50% removed) | fp32 weights | bf16 as saved |\n|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['model']} | {r['config']} | {r['fp32']:.4f} | {r['bf16']:.4f} |")


if __name__ == "__main__":
    main()
