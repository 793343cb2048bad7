"""Every output's claim about who can load it, checked: one compressed tiny model per
format a recipe step can write, then each folder loaded by plain transformers in a process
that never imports moekit. What the report says (``plain_transformers``) — and so the card
and the CLI, which say it in words — must be what happened there:

- "same": it loads, with `moekit.load`'s logits;
- "ignores_routing_policy": it loads, with the logits of the model before the policy
  (every token routed to all top-k experts), not `moekit.load`'s;
- "fails": it raises (moekit's own formats; mixed-width quantized experts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit
from moekit.io.card import who_loads
from tests.checkpoints import write_checkpoints

POLICY = {"type": "routing_policy", "policy": "threshold", "target_fraction": 0.5}
W4 = {"type": "quantize", "method": "rtn", "bits": 4, "group_size": 8}
RECIPES = {  # every step, and every format the steps write
    "prune": [{"type": "prune", "method": "frequency", "keep": 4}],
    "prune-global": [{"type": "prune", "method": "reap", "keep": 4, "budget": "global"}],
    "merge": [{"type": "merge", "keep": 4, "grouping": "msmoe"}],
    "topk": [{"type": "topk", "k": 1}],
    "topk-per-layer": [{"type": "topk", "per_layer": {0: 1}}],
    "drop_layers": [{"type": "drop_layers", "layers": [0]}],
    "drop_blocks": [{"type": "drop_blocks", "layers": [0]}],
    "routing_policy": [POLICY],
    "decompose": [{"type": "decompose", "keep_params": 0.5}],
    "decompose-materialized": [{"type": "decompose", "keep_params": 0.5, "materialize": True}],
    "quantize": [W4],
    "quantize-mixed": [{**W4, "average_bits": 3, "bit_options": [2, 4]}],
    "quantize-then-policy": [W4, POLICY],
}
EXPECTED = {"prune-global": "fails", "topk-per-layer": "fails", "drop_layers": "fails", "decompose": "fails",
            "quantize-mixed": "fails", "routing_policy": "ignores_routing_policy",
            "quantize-then-policy": "ignores_routing_policy"}

PLAIN = textwrap.dedent("""
    import json, sys, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    ids, logits, failed = load_file(sys.argv[1])["input_ids"], {}, {}
    for folder in sys.argv[3:]:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        except Exception as exc:
            failed[folder] = type(exc).__name__
            continue
        with torch.no_grad():
            logits[folder] = model(ids).logits.contiguous()
    assert not any(name.startswith("moekit") for name in sys.modules), "moekit was imported"
    save_file(logits, sys.argv[2])
    print(json.dumps(failed))
""")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = write_checkpoints(tmp_path_factory.mktemp("who-loads"), ["qwen3_moe"], documents=4)
    reports = {name: moekit.compress(str(root / "qwen3_moe"), {"steps": steps}, out_dir=root / name,
                                     data=str(root / "data"), n_samples=4, seq_len=32, progress=False)
               for name, steps in RECIPES.items()}
    ids = torch.randint(3, 290, (2, 12), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, root / "ids.safetensors")
    run = subprocess.run([sys.executable, "-c", PLAIN, str(root / "ids.safetensors"), str(root / "plain.safetensors"),
                          *(str(root / name) for name in RECIPES)], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    failed, plain = json.loads(run.stdout.splitlines()[-1]), load_file(root / "plain.safetensors")
    return root, reports, ids, failed, plain


def _logits(folder, ids):
    with torch.no_grad():
        return moekit.load(str(folder))(ids).logits


@pytest.mark.parametrize("name", RECIPES)
def test_what_each_output_says_about_plain_transformers_is_what_it_does(outputs, name):
    root, reports, ids, failed, plain = outputs
    report, folder = reports[name], str(root / name)
    assert report["plain_transformers"] == EXPECTED.get(name, "same")
    assert who_loads(report) in (root / name / "README.md").read_text()
    if report["plain_transformers"] == "fails":
        assert folder in failed and folder not in plain
        return
    assert folder not in failed
    mine = _logits(folder, ids)  # what moekit.load computes
    if report["plain_transformers"] == "same":
        torch.testing.assert_close(plain[folder], mine, rtol=0, atol=1e-5)
    else:  # the policy ignored: the weights route as they did before it
        before = _logits(root / "quantize", ids) if name.startswith("quantize") else _logits(root / "qwen3_moe", ids)
        torch.testing.assert_close(plain[folder], before, rtol=0, atol=1e-5)
        assert (plain[folder] - mine).abs().max() > 1e-2
        assert "ignores the routing policy" in who_loads(report)


def test_a_calibrated_policy_reports_the_experts_it_computes(outputs):
    root, reports, *_ = outputs
    report = reports["routing_policy"]
    assert report["before"]["experts_per_token"] == 2  # top-k
    assert report["after"]["experts_per_token"] == pytest.approx(1.0, abs=0.05)  # half of top-k, as measured
    assert report["after"]["active_params_with_policy"] < report["after"]["active_params"] == \
        report["before"]["active_params"]
    card = (root / "routing_policy" / "README.md").read_text()
    assert "| experts per token (mean over MoE layers) | 2 | 1" in card and "on average with the routing policy" in card

