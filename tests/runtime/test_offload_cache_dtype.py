"""The cache keeps experts in the checkpoint's dtype (bf16) and upcasts them per call: logits
stay the fully loaded model's bit for bit, the budget counts half the bytes plus the
scratch, and a cache dtype narrower than the stored one rounds exactly as a rounded model."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit.errors import MoekitError
from moekit.runtime.offload import offload
from moekit.zoo.tiny import tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _numel(model) -> tuple[int, int, int]:
    """(values of one expert, MoE layers, top-k) of a uniform tiny model."""
    layers = moekit.moe_layers(model)
    module = layers[0].experts.module
    return sum(p[0].numel() for p in module.parameters(recurse=False)), len(layers), layers[0].top_k


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "mixtral"])  # fused, biased, per-expert names
@pytest.mark.parametrize("spare", [0, 1, 6])  # slots past top-k per layer: 6 = every expert resident
def test_a_bf16_checkpoint_is_cached_in_bf16_and_equals_the_full_model(family, spare, tmp_path, input_ids):
    tiny_model(family, seed=0).to(torch.bfloat16).save_pretrained(tmp_path)
    full = moekit.load(tmp_path)  # fp32 compute
    numel, n_layers, k = _numel(full)
    scratch = 2 * numel * 4  # two fp32 experts
    offloaded = offload(tmp_path, expert_memory=(k + spare) * numel * 2 * n_layers + scratch, prefetch=spare == 1)
    assert set(offloaded.moekit_capacity.values()) == {k + spare}
    state = moekit.moe_layers(offloaded)[0].experts.module._moekit_offload
    assert {s.dtype for s in state.slots.values()} == {torch.bfloat16} and state.scratch.buffer.numel() * 4 == scratch
    # a 24-token prefill needs more than k experts: each computed on its own rows from the scratch
    assert torch.equal(_logits(offloaded, input_ids), _logits(full, input_ids))
    greedy = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(offloaded.generate(input_ids, **greedy), full.generate(input_ids, **greedy))
    assert offloaded.moekit_offload.bytes_moved == (offloaded.moekit_offload.total_misses
                                                    + offloaded.moekit_offload.prefetch_loads) * numel * 2


def test_the_minimum_counts_the_cache_dtype_and_the_scratch(tmp_path):
    tiny_model("qwen3_moe", seed=0).to(torch.bfloat16).save_pretrained(tmp_path)
    numel, n_layers, k = _numel(tiny_model("qwen3_moe"))
    minimum = k * numel * 2 * n_layers + 2 * numel * 4
    with pytest.raises(MoekitError, match=f"minimum is {minimum:,} bytes .* in bfloat16, plus .* to compute from"):
        offload(tmp_path, expert_memory=minimum - 1)
    assert offload(tmp_path, expert_memory=minimum).moekit_capacity == {0: k, 2: k}
    fp32 = k * numel * 4 * n_layers  # an fp32 cache needs no scratch
    with pytest.raises(MoekitError, match=f"minimum is {fp32:,} bytes .* in float32\\)"):
        offload(tmp_path, expert_memory=fp32 - 1, cache_dtype="float32")
    with pytest.raises(MoekitError, match="not a floating-point dtype"):
        offload(tmp_path, expert_memory="1GB", cache_dtype="int8")
    # a share of the routed experts' bytes in the cache dtype, the scratch on top
    assert offload(tmp_path, expert_memory="75%").moekit_capacity == {0: 6, 2: 6}
    assert offload(tmp_path, expert_memory="100%").moekit_capacity == {0: 8, 2: 8}


def test_a_narrower_cache_dtype_rounds_like_a_model_with_rounded_experts(input_ids):
    model = tiny_model("qwen3_moe", seed=0)  # fp32 in memory
    rounded = tiny_model("qwen3_moe", seed=0)
    for layer in moekit.moe_layers(rounded):
        for p in layer.experts.module.parameters(recurse=False):
            p.data = p.data.to(torch.bfloat16).float()
    numel, n_layers, k = _numel(model)
    offloaded = offload(model, expert_memory="1MB", cache_dtype=torch.bfloat16)
    assert offloaded.moekit_cache_dtype == "bfloat16"
    logits = _logits(offloaded, input_ids)
    assert torch.equal(logits, _logits(rounded, input_ids))
    assert not torch.equal(logits, _logits(tiny_model("qwen3_moe", seed=0), input_ids))


def test_every_family_from_a_bf16_checkpoint_equals_the_full_model(family, tmp_path, input_ids):
    tiny_model(family, seed=0).to(torch.bfloat16).save_pretrained(tmp_path)
    full = moekit.load(tmp_path)
    numel, n_layers, k = _numel(full)
    offloaded = offload(tmp_path, expert_memory=k * numel * 2 * n_layers + 2 * numel * 4)
    assert offloaded.moekit_cache_dtype == "bfloat16"
    assert torch.equal(_logits(offloaded, input_ids), _logits(full, input_ids))
