"""Misses computed where the weights are (Fiddler): the slow tier's own copy computes a missed
expert instead of a load; logits stay the fully loaded model's bit for bit on the CPU, the
cost model's choice is the cheaper of its two measured costs, and a disk tier is refused."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.errors import MoekitError
from moekit.runtime.expert_cache import simulate
from moekit.runtime.miss_compute import MissCost
from moekit.runtime.offload import offload
from moekit.zoo.tiny import tiny_model

GREEDY = dict(max_new_tokens=4, do_sample=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _slot_bytes(model, dtype_bytes: int = 4) -> int:
    """Bytes of top-k slots in every layer (the smallest cache) plus a two-expert fp32 scratch."""
    layers = moekit.moe_layers(model)
    numel = sum(p[0].numel() for p in layers[0].experts.module.parameters(recurse=False)
                if p.shape[0] == layers[0].num_experts)
    return layers[0].top_k * numel * dtype_bytes * len(layers) + (2 * numel * 4 if dtype_bytes != 4 else 0)


def test_every_miss_computed_in_place_equals_the_full_model(family, tmp_path, input_ids):
    tiny_model(family, seed=0).save_pretrained(tmp_path)
    full = moekit.load(tmp_path)
    offloaded = offload(tmp_path, expert_memory=_slot_bytes(full), slow_tier="memory", compute_misses="always")
    assert offloaded.moekit_slow_tier == "memory"
    assert torch.equal(_logits(offloaded, input_ids), _logits(full, input_ids))
    assert torch.equal(offloaded.generate(input_ids, **GREEDY), full.generate(input_ids, **GREEDY))
    stats = offloaded.moekit_offload
    # nothing was ever loaded: every needed expert was a miss computed from the slow tier
    assert stats.bytes_moved == 0 and stats.total_hits == 0
    assert stats.total_misses == sum(stats.in_place.values()) > 0 and stats.activation_bytes > 0


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # fused; biased and transposed
def test_a_bf16_slow_tier_is_upcast_one_expert_at_a_time_and_equals_the_full_model(family, tmp_path, input_ids):
    tiny_model(family, seed=0).to(torch.bfloat16).save_pretrained(tmp_path)
    full = moekit.load(tmp_path)  # fp32 compute
    offloaded = offload(tmp_path, expert_memory=_slot_bytes(full, 2), slow_tier="memory", compute_misses="always")
    state = moekit.moe_layers(offloaded)[0].experts.module._moekit_offload
    assert {t.dtype for t in state.compute.tensors.values()} == {torch.bfloat16} and state.compute.upcast
    assert torch.equal(_logits(offloaded, input_ids), _logits(full, input_ids))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_cost_model_that_splits_the_misses_keeps_outputs_and_the_cache_replays(family, model, input_ids):
    """Experts with one row are computed in place, the others loaded: outputs unchanged, and
    the cache's evictions are exactly the simulation of what it was asked to load."""
    reference = _logits(model, input_ids)
    greedy = model.generate(input_ids, **GREEDY)
    offloaded = offload(model, expert_memory=_slot_bytes(model) * 3 // 2, compute_misses="always")
    one_row = MissCost(transfer=1.5, cpu_fixed=0.0, cpu_per_row=1.0, device_fixed=0.0, device_per_row=0.0)
    for layer in moekit.moe_layers(offloaded):
        layer.experts.module._moekit_offload.cost = one_row
    assert torch.equal(_logits(offloaded, input_ids), reference)
    assert torch.equal(offloaded.generate(input_ids, **GREEDY), greedy)
    stats = offloaded.moekit_offload
    assert 0 < sum(stats.in_place.values()) < stats.total_misses  # both kinds happened
    capacity = offloaded.moekit_capacity
    replay = simulate(stats.trace, capacity, "lru", num_experts=moekit.moe_layers(offloaded)[0].num_experts)
    assert replay.evictions == stats.evictions
    assert sum(replay.misses.values()) + sum(stats.in_place.values()) == stats.total_misses


def test_the_cost_model_picks_the_cheaper_side_and_flips_at_the_crossover():
    cost = MissCost(transfer=10.0, cpu_fixed=1.0, cpu_per_row=2.25, device_fixed=0.5, device_per_row=0.25)
    for rows in range(1, 40):
        here, there = 1.0 + 2.25 * rows, 10.5 + 0.25 * rows
        assert cost.in_place(rows) == (here < there)
    assert [cost.in_place(n) for n in (4, 5)] == [True, False]  # crossover at (10.5 - 1) / 2 = 4.75 rows
    assert MissCost(0, 0, 0, 0, 0, mode="always").in_place(10 ** 6)
    assert not MissCost(0, 0, 0, 0, 0, mode="never").in_place(1)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_the_costs_are_measured_without_touching_the_cache(model):
    offloaded = offload(model, expert_memory=_slot_bytes(model), compute_misses="auto")
    cost = offloaded.moekit_miss_cost
    assert cost.mode == "auto" and cost.transfer > 0
    assert cost.cpu_fixed + cost.cpu_per_row > 0 and cost.device_fixed + cost.device_per_row > 0
    assert offloaded.moekit_offload.bytes_moved == 0  # measuring wrote into a spare buffer, not the cache


def test_defaults_and_refusals_before_any_weight_is_read(tmp_path, monkeypatch):
    tiny_model("qwen3_moe", seed=0).save_pretrained(tmp_path)
    on_disk = offload(tmp_path, expert_memory="100%")
    assert on_disk.moekit_slow_tier == "disk" and on_disk.moekit_miss_cost is None  # CPU default: disk, never

    import moekit.runtime.slow_tier as module

    monkeypatch.setattr(module, "open_experts", lambda *a, **k: pytest.fail("read the model before refusing"))
    with pytest.raises(MoekitError, match="add slow_tier='memory'"):
        offload(tmp_path, expert_memory="100%", compute_misses="always")
    with pytest.raises(MoekitError, match="has no files to read experts from"):
        offload(tiny_model("qwen3_moe", seed=0), expert_memory="100%", slow_tier="disk")
    with pytest.raises(MoekitError, match="compute_misses='sometimes' is not one of never, auto, always"):
        offload(tmp_path, expert_memory="100%", compute_misses="sometimes")
    with pytest.raises(MoekitError, match="slow_tier='gpu' is not one of disk, memory"):
        offload(tmp_path, expert_memory="100%", slow_tier="gpu")
    monkeypatch.undo()
    with pytest.raises(MoekitError, match="Llama-4's experts do not take; choose 'always' or 'never'"):
        offload(tiny_model("llama4", seed=0), expert_memory="100%", compute_misses="auto")
