"""`moekit run`: the generated text is the full model's greedy text, the numbers are in
the JSON, refusals are one line, and the help imports nothing heavy."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

import moekit
from moekit.cli import app
from moekit.io.tokenizer import tokenizer_for

runner = CliRunner()
TINY = "moekit/tiny-qwen3_moe"
EXPERT_BYTES = (32 * 32 + 32 * 16) * 4  # gate_up [32, 32] + down [32, 16], fp32
LAYERS, TOP_K = 2, 2


def test_run_json_text_equals_the_full_models_greedy_text():
    budget = 3 * EXPERT_BYTES * LAYERS
    result = runner.invoke(app, ["run", TINY, "--prompt", "hello world", "--max-new-tokens", "6",
                                 "--expert-memory", str(budget), "--prefetch", "--policy", "lfu", "--json",
                                 "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    tokenizer = tokenizer_for(TINY)
    ids = tokenizer("hello world", return_tensors="pt").input_ids
    full = moekit.load(TINY).generate(ids, max_new_tokens=6, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    assert report["text"] == tokenizer.decode(full[0, ids.shape[1]:], skip_special_tokens=True)
    assert report["new_tokens"] == full.shape[1] - ids.shape[1]
    assert report["slots"] == {"0": 3, "2": 3} and report["cache_dtype"] == "float32"  # the tiny model's own
    assert report["tokens"] == ids.shape[1] + report["new_tokens"] - 1  # the last token is never fed back
    assert report["bytes_moved_per_token"] == report["bytes_moved"] / report["tokens"]
    assert report["bytes_moved"] == (report["misses"] + report["prefetch_loads"]) * EXPERT_BYTES
    assert 0 <= report["hit_rate"] <= 1 and report["prefetch_recall"] is not None
    assert report["peak_rss_bytes"] > 0 and report["tokens_per_s"] > 0


def test_run_streams_text_then_the_numbers():
    result = runner.invoke(app, ["run", TINY, "--prompt", "hi", "--max-new-tokens", "3", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.stdout and "hit rate" in result.stdout and "moved per token" in result.stdout


def test_run_refuses_a_budget_below_top_k_and_prior_without_stats():
    result = runner.invoke(app, ["run", TINY, "--expert-memory", "1KB", "--threads", "1"])
    assert result.exit_code == 2
    assert f"minimum is {LAYERS * TOP_K * EXPERT_BYTES:,} bytes" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["run", TINY, "--policy", "prior", "--threads", "1"])
    assert result.exit_code == 2 and "--stats" in result.output
    result = runner.invoke(app, ["run", TINY, "--expert-memory", "plenty"])
    assert result.exit_code == 2 and "not a size" in result.output
    result = runner.invoke(app, ["run", TINY, "--cache-dtype", "int8", "--threads", "1"])
    assert result.exit_code == 2 and "not a floating-point dtype" in result.output


def test_run_computes_misses_in_place_with_the_same_text_and_says_so(tmp_path):
    """--compute-misses auto on a CPU, where the tiny model is its own memory tier: whichever
    side the measured costs pick for each miss, the text is the full model's, and the run
    reports its tier and cost model."""
    result = runner.invoke(app, ["run", TINY, "--prompt", "hello world", "--max-new-tokens", "4", "--json",
                                 "--compute-misses", "auto", "--expert-memory", str(2 * EXPERT_BYTES * LAYERS),
                                 "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    plain = json.loads(runner.invoke(app, ["run", TINY, "--prompt", "hello world", "--max-new-tokens", "4",
                                           "--json", "--threads", "1"]).stdout)
    assert report["text"] == plain["text"] and report["slow_tier"] == "memory"
    assert report["miss_cost"]["mode"] == "auto" and plain["miss_cost"] is None and plain["computed_in_place"] == 0
    moekit.load(TINY).save_pretrained(tmp_path)
    tokenizer_for(TINY).save_pretrained(tmp_path)
    refused = runner.invoke(app, ["run", str(tmp_path), "--compute-misses", "always", "--threads", "1"])
    assert refused.exit_code == 2 and "--slow-tier memory" in refused.output


def test_run_help_imports_nothing_heavy():
    probe = ("import sys\nfrom moekit.cli import app\napp(['run', '--help'], standalone_mode=False)\n"
             "print('heavy:', sorted(m for m in sys.modules if m.startswith(('torch', 'transformers', 'moekit.runtime',"
             " 'moekit.io', 'safetensors'))))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--expert-memory" in done.stdout and done.stdout.splitlines()[-1] == "heavy: []"


def test_run_prior_reads_saved_statistics(tmp_path):
    import torch

    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    stats = moekit.calibrate(moekit.load(TINY), ids, progress=False)
    folder = stats.save(tmp_path / "stats")
    result = runner.invoke(app, ["run", TINY, "--prompt", "hi", "--max-new-tokens", "3", "--policy", "prior",
                                 "--stats", str(folder), "--expert-memory", str(3 * EXPERT_BYTES * LAYERS),
                                 "--json", "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["policy"] == "prior" and report["warm_bytes"] == 3 * EXPERT_BYTES * LAYERS  # pinned up front
    result = runner.invoke(app, ["run", TINY, "--policy", "prior", "--stats", str(tmp_path)])
    assert result.exit_code == 2 and "not a moekit statistics folder" in result.output
