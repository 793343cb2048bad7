"""Peak memory of calibration grows with one layer's activations, not with depth."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))

from calibration_memory import run  # noqa: E402


def test_peak_memory_does_not_grow_with_depth():
    sizes = dict(hidden=256, samples=16, seq_len=512)
    one_copy_mib = sizes["samples"] * sizes["seq_len"] * sizes["hidden"] * 4 / 2**20  # 8 MiB
    shallow, deep = run(depths=(2, 12), modes=("moekit",), **sizes)
    growth = deep["peak_above_baseline_mib"] - shallow["peak_above_baseline_mib"]
    # Holding every layer's activations would add >= 10 copies (80 MiB) over 10 more layers;
    # peak RSS itself varies by up to ~12 MiB between identical runs (allocator), hence 3.
    assert growth < 3 * one_copy_mib, (shallow, deep)
