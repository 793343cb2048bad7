"""Cache policies: the reference behaviour of LRU/LFU/prior on hand traces, the runtime's
evictions equal `simulate` on its own trace, the byte counter against a hand count on a
scripted routing, and prefetch never changes outputs."""

from __future__ import annotations

import copy

import pytest
import torch

import moekit
from moekit.runtime.expert_cache import LayerCache, simulate
from moekit.runtime.offload import offload
from moekit.zoo.tiny import tiny_model


def test_lru_evicts_the_least_recently_used():
    trace = [("demand", 0, [0, 1]), ("demand", 0, [2]), ("demand", 0, [0]), ("demand", 0, [3])]
    result = simulate(trace, capacity=3, policy="lru", num_experts=8)
    assert result.evictions == [(0, 1)]  # resident {0,1,2}; 1 is the oldest use
    assert (result.hits[0], result.misses[0]) == (1, 4)


def test_lfu_keeps_the_often_used_even_after_eviction():
    trace = [("demand", 0, [e]) for e in (0, 0, 0, 1, 2, 1, 3, 0)]
    result = simulate(trace, capacity=2, policy="lfu", num_experts=8)
    # [2] evicts 1 (1 use against 0's 3), [1] evicts 2, [3] evicts 1 (2 uses): 0 is never evicted
    assert result.evictions == [(0, 1), (0, 2), (0, 1)]
    assert result.hits[0] == 3
    lru = simulate(trace, capacity=2, policy="lru", num_experts=8)
    assert lru.evictions == [(0, 0), (0, 2), (0, 1)]  # LRU drops 0 at the first [2]


def test_prior_pins_the_best_scored_experts():
    prior = {0: [0.1, 5.0, 0.2, 3.0]}
    trace = [("demand", 0, [0]), ("demand", 0, [2]), ("demand", 0, [1, 3])]
    result = simulate(trace, capacity=3, policy="prior", num_experts=4, prior=prior)
    assert result.warm_loads[0] == 3  # 1, 3 and 2 start resident
    assert result.evictions == [(0, 2), (0, 0)]  # 0 evicts the lowest prior (2), then 2 evicts 0
    assert result.hits[0] == 2
    # 4 slots, top-1: 1, 3, 2 pinned, 0 warm in the one slot that churns
    trace = [("demand", 0, [e]) for e in (0, 4, 5, 4, 0, 1)]
    result = simulate(trace, capacity=4, policy="prior", num_experts=6, prior={0: [0.1, 5.0, 0.2, 3.0, 0, 0]})
    assert result.evictions == [(0, 0), (0, 4), (0, 5), (0, 4)]  # never a pinned one
    assert result.hits[0] == 2  # the first 0 (warm) and 1 (pinned)
    # two unpinned slots (top-2): LRU among them
    result = simulate(trace, capacity=4, policy="prior", num_experts=6, prior={0: [0.1, 5.0, 0.2, 3.0, 0, 0]},
                      top_k=2)
    assert result.evictions == [(0, 2), (0, 0), (0, 5)]  # 2 unpinned now; 5 is older than 4 at the last 0
    assert result.hits[0] == 3


def test_a_request_larger_than_the_cache_is_planned_in_parts_resident_first():
    cache = LayerCache(8, 2, "lru")
    cache.request([5, 6])
    assert cache.plan([7, 1, 2, 5, 5]) == [[1, 5], [2, 7]]  # resident 5 first, then 1, 2, 7
    with pytest.raises(ValueError, match="use plan"):
        cache.request([1, 2, 3])


@pytest.mark.parametrize("policy", ["lru", "lfu", "prior"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_runtime_evictions_equal_the_simulation(policy, prefetch, input_ids):
    model = tiny_model("olmoe", seed=1)
    layers = moekit.moe_layers(model)
    prior = {layer.index: torch.arange(layer.num_experts, dtype=torch.float).flip(0) for layer in layers}
    size = sum(p[0].numel() for p in layers[0].experts.module.parameters(recurse=False)) * 4
    offloaded = offload(model, expert_memory=3 * size * len(layers), policy=policy, prefetch=prefetch,
                        stats=prior)
    offloaded.generate(input_ids[:1], max_new_tokens=12, do_sample=False)
    stats = offloaded.moekit_offload
    capacity = offloaded.moekit_capacity
    replay = simulate(stats.trace, capacity, policy, num_experts=8,
                      prior={i: p.tolist() for i, p in prior.items()}, top_k=2)
    assert stats.evictions and replay.evictions == stats.evictions
    assert replay.hits == stats.hits and replay.misses == stats.misses
    assert sum(replay.prefetch_loads.values()) == stats.prefetch_loads
    moved = (stats.total_misses + stats.prefetch_loads) * size
    assert stats.bytes_moved == moved and stats.warm_bytes == sum(replay.warm_loads.values()) * size


def test_byte_counter_equals_a_hand_count_on_a_scripted_routing():
    model = tiny_model("mixtral", seed=0)
    layer = moekit.moe_layers(model)[0]
    full_experts = copy.deepcopy(layer.experts.module)
    # mixtral tiny: gate_up [8, 48, 32], down [8, 32, 24]: one expert = (48·32 + 32·24) fp32 values
    expert_bytes = (48 * 32 + 32 * 24) * 4
    offloaded = offload(model, expert_memory=2 * expert_bytes * 3)  # 3 layers, 2 slots each (LRU)
    experts = moekit.moe_layers(offloaded)[0].experts.module
    hidden = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
    script = [[[0, 1], [1, 0]],  # loads 0, 1                       -> 2 misses
              [[1, 2], [2, 1]],  # 1 hit, loads 2 (evicts 0)          -> 1
              [[0, 1], [0, 1]],  # 1 hit, loads 0 (evicts 2)          -> 1
              [[3, 0], [0, 3]],  # 0 hit, loads 3 (evicts 1)          -> 1
              [[3, 0], [3, 0]]]  # both hit                           -> 0
    for routing in script:
        index = torch.tensor(routing)
        with torch.no_grad():
            assert torch.equal(experts(hidden, index, weights), full_experts(hidden, index, weights))
    stats = offloaded.moekit_offload
    assert stats.misses[0] == 5 and stats.hits[0] == 5
    assert stats.bytes_moved == 5 * expert_bytes == 46_080
    assert stats.tokens == 10 and stats.bytes_moved_per_token == 4_608
    assert stats.evictions == [(0, 0), (0, 2), (0, 1)]


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_prefetch_never_changes_outputs_and_reports_quality(family, input_ids):
    model = tiny_model(family, seed=0)
    layers = moekit.moe_layers(model)
    size = sum(p[0].numel() for p in layers[0].experts.module.parameters(recurse=False)) * 4
    greedy = dict(max_new_tokens=8, do_sample=False)
    expected = model.generate(input_ids, **greedy)
    plain = offload(copy.deepcopy(model), expert_memory=2 * size * len(layers))
    guessed = offload(copy.deepcopy(model), expert_memory=2 * size * len(layers), prefetch=True)
    assert torch.equal(plain.generate(input_ids, **greedy), expected)
    assert torch.equal(guessed.generate(input_ids, **greedy), expected)
    stats = guessed.moekit_offload
    assert stats.prefetch_loads > 0
    assert 0 < stats.prefetch_precision <= 1 and 0 < stats.prefetch_recall <= 1
    assert plain.moekit_offload.prefetch_precision is None


def test_per_layer_budgets_from_the_prior_go_where_routing_is_spread():
    from moekit.runtime.offload_budget import allocate

    sizes, experts, top_k = {0: 10, 2: 10}, {0: 8, 2: 8}, {0: 2, 2: 2}
    concentrated, flat = [100, 100, 1, 1, 1, 1, 1, 1], [1] * 8
    assert allocate(60, experts, top_k, sizes) == {0: 3, 2: 3}  # no prior: even
    assert allocate(60, experts, top_k, sizes, {0: concentrated, 2: flat}) == {0: 2, 2: 4}
    model = tiny_model("qwen3_moe")
    size = (32 * 32 + 32 * 16) * 4
    offloaded = offload(model, expert_memory=6 * size, policy="prior",
                        stats={0: torch.tensor(concentrated, dtype=torch.float), 2: torch.ones(8)})
    assert offloaded.moekit_capacity == {0: 2, 2: 4}
