"""Offloading onto a GPU (skipped without CUDA; `benchmarks/gpu_offload.sh` runs these on a
lent GPU machine): the slow tier is pinned CPU memory, prefetch copies run on their own CUDA
stream, misses may be computed on the CPU; logits match the fully loaded model on the GPU
(the CPU rounds differently from the GPU, so within fp32 tolerance, not bit for bit) and
greedy generations are equal."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.runtime.offload import offload
from moekit.zoo.tiny import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GREEDY = dict(max_new_tokens=6, do_sample=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "mixtral"])
@pytest.mark.parametrize("compute_misses", ["never", "always", "auto"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_a_gpu_offload_with_a_pinned_memory_tier_matches_the_full_model(family, compute_misses, prefetch, tmp_path,
                                                                        input_ids):
    tiny_model(family, seed=0).save_pretrained(tmp_path)
    full = moekit.load(tmp_path).to("cuda")
    ids = input_ids.to("cuda")
    offloaded = offload(tmp_path, expert_memory="50%", device="cuda", prefetch=prefetch,
                        compute_misses=compute_misses)
    state = moekit.moe_layers(offloaded)[0].experts.module._moekit_offload
    assert offloaded.moekit_slow_tier == "memory" and state.stream is not None
    assert all(t.is_pinned() for t in state.source.tensors.values())
    assert all(s.device.type == "cuda" for s in state.slots.values())
    torch.testing.assert_close(_logits(offloaded, ids), _logits(full, ids), atol=2e-4, rtol=2e-4)
    assert torch.equal(offloaded.generate(ids, **GREEDY), full.generate(ids, **GREEDY))
    stats = offloaded.moekit_offload
    if compute_misses == "never":
        assert not stats.in_place and stats.activation_bytes == 0
    if compute_misses == "always":
        assert sum(stats.in_place.values()) == stats.total_misses > 0


def test_a_gpu_offload_from_the_disk_tier_matches_the_full_model(tmp_path, input_ids):
    tiny_model("qwen3_moe", seed=0).to(torch.bfloat16).save_pretrained(tmp_path)
    full = moekit.load(tmp_path).to("cuda")
    ids = input_ids.to("cuda")
    offloaded = offload(tmp_path, expert_memory="50%", device="cuda", slow_tier="disk", prefetch=True)
    assert offloaded.moekit_slow_tier == "disk" and offloaded.moekit_miss_cost is None
    torch.testing.assert_close(_logits(offloaded, ids), _logits(full, ids), atol=2e-4, rtol=2e-4)
    assert torch.equal(offloaded.generate(ids, **GREEDY), full.generate(ids, **GREEDY))


def test_a_gpu_measures_its_cost_model_by_default(tmp_path):
    tiny_model("qwen3_moe", seed=0).save_pretrained(tmp_path)
    cost = offload(tmp_path, expert_memory="50%", device="cuda").moekit_miss_cost
    assert cost.mode == "auto" and cost.transfer > 0 and cost.device_fixed + cost.device_per_row > 0
