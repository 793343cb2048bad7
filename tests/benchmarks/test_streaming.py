"""benchmarks/measure.py and streaming.py measure what they claim, on real child processes."""

from __future__ import annotations

import json
import os
import tempfile
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import measure  # noqa: E402
import streaming  # noqa: E402
import streaming_report  # noqa: E402
import synthetic  # noqa: E402

PY = sys.executable
MIB = 2**20


def test_peak_rss_exit_code_and_last_stderr_line():
    code = "import sys, time; a = bytearray(200 * 2**20); time.sleep(0.6); print('boom: bad', file=sys.stderr); sys.exit(3)"
    r = measure.run([PY, "-c", code])
    assert r["exit_code"] == 3 and r["killed"] is None
    assert r["last_stderr_line"] == "boom: bad"
    assert 200 <= r["peak_rss_mib"] < 400  # the bytearray is touched, so it is resident
    assert r["peak_anon_mib"] >= 200 and r["samples"] >= 2


def test_memory_of_a_grandchild_is_seen_by_the_sampler():
    inner = "import time; a = bytearray(150 * 2**20); time.sleep(1.0)"
    r = measure.run([PY, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {inner!r}])"])
    assert r["exit_code"] == 0
    assert r["peak_tree_rss_mib"] >= 150 + 5  # the grandchild's bytearray plus the parent interpreter
    assert r["peak_rss_mib"] >= 150  # wait4 reports the largest waited-for descendant


def test_memory_limit_kills_the_process_group():
    grow = "import time\nblocks = []\nfor _ in range(60):\n    blocks.append(bytearray(25 * 2**20)); time.sleep(0.05)"
    r = measure.run([PY, "-c", grow], mem_limit=250 * MIB)
    assert r["killed"] == "memory limit" and r["exit_code"] == -9
    assert 250 <= r["killed_at_rss_mib"] < 250 + 200  # stopped soon after the limit, far below 1.5 GiB


def test_disk_reads_are_counted_after_eviction_and_not_from_the_cache(tmp_path):
    data = tmp_path / "ckpt"
    data.mkdir()
    (data / "blob.bin").write_bytes(os.urandom(32 * MIB))
    read = [PY, "-c", f"open({str(data / 'blob.bin')!r}, 'rb').read()"]
    measure.run(read)  # now in the page cache
    warm = measure.run(read)
    cache = measure.evict(data)
    cold = measure.run(read)
    assert warm["rchar_bytes"] >= 32 * MIB and cold["rchar_bytes"] >= 32 * MIB
    assert warm["disk_read_bytes"] < 4 * MIB
    if cache["resident_after_bytes"] == 0:  # eviction worked on this file system
        assert cold["disk_read_bytes"] >= 32 * MIB


def test_harness_end_to_end_on_a_tiny_preset(tmp_path):
    """Written, read once, the forward floor, a failing moekit run recorded, merged, rendered, deleted."""
    from argparse import Namespace

    sizes = dict(layers=2, hidden=64, experts=4, expert_width=32, top_k=2)
    args = Namespace(runs=["missing"], no_floors=False, mem_limit_gib=4.0, timeout=600, results=tmp_path / "r.json")
    streaming.RUNS["missing"] = ["eval", str(tmp_path / "no-such-model"), "--json"]
    try:
        streaming.measure_preset("tiny-test", sizes, args, {"current @ test": None})
    finally:
        del streaming.RUNS["missing"]
    assert not (Path(tempfile.gettempdir()) / "moekit-bench-tiny-test").exists()  # never left behind

    data = json.loads(args.results.read_text())
    by_run = {r["run"]: r for r in data["runs"]}
    params = synthetic.meta_model(synthetic.make_config("qwen3_moe", **sizes)).num_parameters()
    assert by_run["write"]["exit_code"] == 0 and by_run["write"]["report"]["parameters"] == params
    assert by_run["read once"]["exit_code"] == 0 and by_run["read once"]["report"]["elements"] == params
    fwd = by_run["forward one layer"]["report"]
    assert fwd["layers"] == 2 and fwd["layer_s"] > 0
    failed = by_run["missing"]
    assert failed["exit_code"] not in (0, None) and failed["last_stderr_line"]  # recorded, not raised
    assert data["checkpoints"]["tiny-test"]["layers"] == 2

    streaming.save(data["runs"][:1], {}, args.results)  # a rerun replaces, never duplicates
    data = json.loads(args.results.read_text())
    assert len(data["runs"]) == 4
    assert "| tiny-test | current @ test | read once | 0 |" in streaming_report.render(data)
    assert streaming_report.floor_seconds(data, "tiny-test") == pytest.approx(
        by_run["read once"]["wall_s"] + fwd["layer_s"] * 2)
    assert all(status == "not measured" for goal, status, _ in streaming_report.goals(data) if "s24" in goal)
