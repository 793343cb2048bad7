"""inspect's counts equal an independent count over model.named_parameters()."""

from __future__ import annotations

import re

import torch

import moekit


def test_counts_match_named_parameters(family, model):
    summary = moekit.summarize(model)
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    routed_by_layer: dict[int, int] = {}
    for name, p in named.items():
        m = re.search(r"layers\.(\d+)\.[^.]+\.experts\.", name)
        if m:
            routed_by_layer[int(m.group(1))] = routed_by_layer.get(int(m.group(1)), 0) + p.numel()
    k_over_e = {l.index: l.top_k / l.num_experts for l in moekit.moe_layers(model)}
    active = total - sum(routed_by_layer.values()) + round(sum(n * k_over_e[i] for i, n in routed_by_layer.items()))

    assert summary.total_params == total
    assert summary.routed_params == sum(routed_by_layer.values())
    assert summary.active_params == active
    assert {l.index: l.routed_params for l in summary.layers if l.kind == "moe"} == routed_by_layer
    assert 0 < summary.routed_share < 1
    assert summary.family == family


def test_counts_follow_pruning(model):
    before = moekit.summarize(model)
    moekit.keep_experts(model, {l.index: [0, 3, 5, 6] for l in moekit.moe_layers(model)})
    after = moekit.summarize(model)
    assert after.routed_params * 2 == before.routed_params
    assert after.total_params < before.total_params
    assert all(l.num_experts == 4 for l in after.layers if l.kind == "moe")


def test_bytes_are_what_the_checkpoint_holds(family, model, tmp_path):
    """The tensor bytes transformers writes for the model in fp32, and for it loaded in
    bf16 (where DeepSeek-V3-style routers and correction biases stay fp32)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    def on_disk(folder):
        counts: dict[str, int] = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    name = str(t.dtype).removeprefix("torch.")
                    counts[name] = counts.get(name, 0) + t.numel() * t.element_size()
        return counts

    model.save_pretrained(tmp_path / "fp32")
    AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert dict(moekit.summarize(model).bytes_by_dtype) == on_disk(tmp_path / "fp32")
    assert dict(moekit.summarize(model, stored_dtype=torch.bfloat16).bytes_by_dtype) == on_disk(tmp_path / "bf16")
