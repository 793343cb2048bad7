"""moekit.offload: logits and greedy generations equal the fully loaded model's, for every
tiny family, from memory and from the checkpoint's files, at several cache sizes down to
exactly top-k experts per layer; refusals."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

import moekit
from moekit.errors import MoekitError
from moekit.runtime.offload import offload
from moekit.zoo.tiny import tiny_model


def _expert_bytes(model) -> tuple[int, int, int]:
    """(bytes of one fp32 expert, MoE layers, top-k) of a uniform tiny model."""
    layers = moekit.moe_layers(model)
    experts = layers[0].experts.module
    size = sum(p[0].numel() for p in experts.parameters(recurse=False) if p.shape[0] == layers[0].num_experts) * 4
    return size, len(layers), layers[0].top_k


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("slots", [2, 3, 8])  # 2 = exactly top-k per layer; 8 = every expert
def test_in_memory_equals_full_model(family, model, input_ids, slots):
    reference = _logits(model, input_ids)
    size, n_layers, k = _expert_bytes(model)
    assert k == 2
    offloaded = offload(copy.deepcopy(model), expert_memory=slots * size * n_layers)
    assert set(offloaded.moekit_capacity.values()) == {slots}
    assert torch.equal(_logits(offloaded, input_ids), reference)  # prefill of 24 tokens needs > 2 experts: in parts
    stats = offloaded.moekit_offload
    assert stats.tokens == input_ids.numel()
    assert stats.total_misses * size == stats.bytes_moved
    # one call per layer: each expert it needs is loaded once, in whichever part
    assert stats.total_misses == sum(len(experts) for _, _, experts in stats.trace)


def test_from_files_equals_full_model_and_generates_the_same(family, tmp_path, input_ids):
    tiny_model(family, seed=0).save_pretrained(tmp_path)
    full = moekit.load(tmp_path)
    size, n_layers, _ = _expert_bytes(full)
    offloaded = offload(tmp_path, expert_memory=2 * size * n_layers, policy="lfu", prefetch=True)
    # the experts are not in memory: the module holds meta tensors, the cache its 2 slots
    experts = moekit.moe_layers(offloaded)[0].experts.module
    assert experts.gate_up_proj.device.type == "meta"
    assert experts._moekit_offload.slots["gate_up_proj"].shape[0] == 2
    assert torch.equal(_logits(offloaded, input_ids), _logits(full, input_ids))
    greedy = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(offloaded.generate(input_ids, **greedy), full.generate(input_ids, **greedy))


def test_per_expert_checkpoint_names_are_read_through_transformers_conversion(tmp_path):
    tiny_model("mixtral", seed=0).save_pretrained(tmp_path)
    offloaded = offload(tmp_path, expert_memory="1MB")
    source = moekit.moe_layers(offloaded)[0].experts.module._moekit_offload.source
    assert set(source.per_expert) == {"gate_up_proj", "down_proj"} and not source.direct
    patterns = source.per_expert["gate_up_proj"]
    assert len(patterns) == 2 and all(len(names) == 8 for names in patterns.values())  # w1, w3 per expert
    full = moekit.moe_layers(moekit.load(tmp_path))[0].experts
    for expert in (0, 5):
        with source.reading():
            read = source.read(expert)
        assert torch.equal(read["gate_up_proj"].float(), full.module.gate_up_proj[expert])
        assert torch.equal(read["down_proj"].float(), full.module.down_proj[expert])


def test_a_budget_below_top_k_per_layer_is_refused_with_the_minimum():
    model = tiny_model("qwen3_moe")
    size, n_layers, k = _expert_bytes(model)
    minimum = n_layers * k * size
    with pytest.raises(MoekitError, match=f"minimum is {minimum:,} bytes"):
        offload(model, expert_memory=minimum - 1)
    offload(model, expert_memory=minimum)  # exactly the minimum is fine
    with pytest.raises(MoekitError, match="not a size"):
        offload(tiny_model("qwen3_moe"), expert_memory="lots")
    with pytest.raises(MoekitError, match="not one of"):
        offload(tiny_model("qwen3_moe"), expert_memory="1GB", policy="fifo")
    with pytest.raises(MoekitError, match="stats="):
        offload(tiny_model("qwen3_moe"), expert_memory="1GB", policy="prior")
    with pytest.raises(MoekitError, match="already offloaded"):
        offload(model, expert_memory="1GB")


@pytest.mark.parametrize("prefetch", [False, True])  # True: the failed read is on the background thread
def test_a_folder_that_disappears_mid_run_is_a_clear_error(tmp_path, input_ids, prefetch):
    folder = tmp_path / "model"
    tiny_model("mixtral", seed=0).save_pretrained(folder)
    size, n_layers, k = _expert_bytes(tiny_model("mixtral"))
    offloaded = offload(folder, expert_memory=k * size * n_layers, prefetch=prefetch)
    _logits(offloaded, input_ids[:, :4])
    shutil.rmtree(folder)
    with pytest.raises(MoekitError, match="moved or deleted while running"):
        _logits(offloaded, input_ids)


def test_reference_models_from_files_equal_the_full_model(input_ids):
    for name in ("moekit/ref-fine", "moekit/ref-coarse"):
        full = moekit.load(name)
        layers = moekit.moe_layers(full)
        numel = sum(p[0].numel() for p in layers[0].experts.module.parameters(recurse=False))
        k = layers[0].top_k
        # stored in bf16, cached in bf16 (2 bytes), upcast one at a time into a scratch of 2 fp32 experts
        offloaded = offload(name, expert_memory=k * numel * 2 * len(layers) + 2 * numel * 4, prefetch=True)
        assert set(offloaded.moekit_capacity.values()) == {k} and offloaded.moekit_cache_dtype == "bfloat16"
        ids = input_ids[:1, :8]
        assert torch.equal(_logits(offloaded, ids), _logits(full, ids))
        greedy = dict(max_new_tokens=8, do_sample=False)
        assert torch.equal(offloaded.generate(ids, **greedy), full.generate(ids, **greedy))


def test_the_direct_copy_of_per_expert_tensors_equals_transformers_conversion(tmp_path):
    tiny_model("qwen2_moe", seed=0).save_pretrained(tmp_path)
    offloaded = offload(tmp_path, expert_memory="1MB")
    source = moekit.moe_layers(offloaded)[0].experts.module._moekit_offload.source
    assert source.layout["gate_up_proj"] == (0, list(source.per_expert["gate_up_proj"]))
    out = {name: torch.empty(shape[1:]) for name, shape in source.shapes.items()}
    with source.reading():
        source.read_into(3, out)
        converted = source.read(3)
    assert all(torch.equal(out[name], converted[name].float()) for name in out)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])  # per-expert tensors; fused tensors
def test_misses_are_read_straight_from_the_file_into_the_slots(family, tmp_path, input_ids, monkeypatch):
    from moekit.runtime.expert_store import DiskExperts

    tiny_model(family, seed=0).save_pretrained(tmp_path)
    full = moekit.load(tmp_path)
    offloaded = offload(tmp_path, expert_memory="1MB")
    monkeypatch.setattr(DiskExperts, "_read", lambda *a, **k: pytest.fail("read through safetensors"))
    assert torch.equal(_logits(offloaded, input_ids), _logits(full, input_ids))


def test_llama4_loads_only_the_experts_its_tokens_chose(input_ids):
    """Llama-4's experts module multiplies every expert on every token (unchosen ones on zero
    rows); offloaded, a call loads only the experts with a nonzero row."""
    model = tiny_model("llama4", seed=0)
    reference = [_logits(model, token.view(1, 1)) for token in input_ids[0, :6]]
    size, n_layers, k = _expert_bytes(model)
    offloaded = offload(model, expert_memory=k * size * n_layers)
    for token, expected in zip(input_ids[0, :6], reference):
        assert torch.equal(_logits(offloaded, token.view(1, 1)), expected)
    assert {len(experts) for _, _, experts in offloaded.moekit_offload.trace} == {k}


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_a_top_1_model_with_one_slot_per_layer_equals_the_full_model(family, input_ids):
    """grouped_mm over a single expert takes its row count from the data and would multiply
    the skipped rows too (other bits); the runtime never calls it with fewer than two."""
    model = tiny_model(family, seed=0)
    model.config.num_experts_per_tok = 1
    for layer in moekit.moe_layers(model):
        for module in layer.block.modules():
            if hasattr(module, "top_k"):
                module.top_k = 1
    reference = _logits(model, input_ids)
    size, n_layers, k = _expert_bytes(model)
    offloaded = offload(model, expert_memory=size * n_layers)
    assert k == 1 and set(offloaded.moekit_capacity.values()) == {1}
    assert torch.equal(_logits(offloaded, input_ids), reference)
