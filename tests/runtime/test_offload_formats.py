"""moekit's own outputs offload too: non-uniform expert counts (moekit format, fused names on
disk) and quantized compressed-tensors checkpoints (experts dequantized as they are read);
logits equal `moekit.load`'s."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import moekit
from moekit.io.save import write_checkpoint
from moekit.runtime.offload import offload
from moekit.zoo.tiny import tiny_model
from tests.checkpoints import write_checkpoints


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _expert_bytes(model) -> int:
    layer = moekit.moe_layers(model)[0]
    return sum(p[0].numel() for p in layer.experts.module.parameters(recurse=False)) * 4


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_non_uniform_expert_counts(family, tmp_path, input_ids):
    model = tiny_model(family, seed=0)
    layers = moekit.moe_layers(model)
    moekit.keep_experts(model, {layers[0].index: [0, 2, 3, 5, 7], layers[-1].index: [1, 2, 3, 4, 5, 6]})
    assert write_checkpoint(model, tmp_path) == "moekit-nonuniform"
    full = moekit.load(tmp_path)
    offloaded = offload(tmp_path, expert_memory=3 * _expert_bytes(full) * len(layers))
    assert [L.num_experts for L in moekit.moe_layers(offloaded)] == [5, 8, 6]
    assert offloaded.moekit_capacity == {0: 2, 1: 4, 2: 3}  # 9 slots, shared by resident fraction
    assert torch.equal(_logits(offloaded, input_ids), _logits(full, input_ids))


def test_quantized_checkpoint_is_dequantized_into_the_cache(tmp_path):
    sources = write_checkpoints(tmp_path, ["qwen3_moe"], documents=4)
    out = tmp_path / "w4"
    moekit.compress(str(sources / "qwen3_moe"), {"steps": [{"type": "quantize", "bits": 4, "group_size": 8}]},
                    out_dir=out, data=str(sources / "data"), n_samples=4, seq_len=32, progress=False)
    full = moekit.load(out)
    offloaded = offload(out, expert_memory=2 * _expert_bytes(full) * 2, prefetch=True)
    source = moekit.moe_layers(offloaded)[0].experts.module._moekit_offload.source
    assert set(source.per_expert) == {"gate_up_proj", "down_proj"}
    assert any(key in source.checkpoint.packed for p in source.per_expert.values() for keys in p.values()
               for key in keys)  # the experts are read packed and decompressed
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(offloaded, ids), _logits(full, ids))
    assert Path(out, "model.safetensors").is_file()


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_a_routing_policy_composes_skipped_experts_are_never_loaded(family, input_ids):
    from moekit.methods.dynamic.policy import SkipPolicy
    from moekit.methods.dynamic.install import set_routing_policy

    full = tiny_model(family, seed=0)
    set_routing_policy(full, SkipPolicy(beta=0.9))
    offloaded = offload(tiny_model(family, seed=0), expert_memory=2 * _expert_bytes(full) * 2)
    set_routing_policy(offloaded, SkipPolicy(beta=0.9))  # installed after offloading: its hook runs first
    assert torch.equal(_logits(offloaded, input_ids), _logits(full, input_ids))
    plain = offload(tiny_model(family, seed=0), expert_memory=2 * _expert_bytes(full) * 2)
    for model in (offloaded, plain):
        model.moekit_offload.reset()
        for token in input_ids[0]:  # one token per call: a call needs exactly that token's kept experts
            _logits(model, token.view(1, 1))
    kept = [len(e) for _, _, e in offloaded.moekit_offload.trace]
    routed = [len(e) for _, _, e in plain.moekit_offload.trace]
    assert all(a <= b for a, b in zip(kept, routed)) and sum(kept) < sum(routed)  # the sentinel E is no expert


def test_a_factored_output_is_refused_with_the_fix_before_any_weight_is_read(tmp_path, input_ids, monkeypatch):
    """A decompose output's experts are low-rank factors, which the expert cache does not
    hold: the refusal names --materialize, from the config alone."""
    import moekit.io.load
    from moekit.calib.calibrate import calibrate
    from moekit.errors import MoekitError
    from moekit.recipe.steps.decompose import Decompose

    model = tiny_model("qwen3_moe")
    step = Decompose(keep_params=0.5)
    step.apply(model, calibrate(model, input_ids, statistics=step.needs(), hidden_sample=step.hidden_sample(),
                                progress=False))
    write_checkpoint(model, tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(moekit.io.load, "open_model", never)
    for source in (tmp_path, model):
        with pytest.raises(MoekitError, match="experts are factored .* moekit compress --materialize"):
            offload(source, expert_memory="1MB")
