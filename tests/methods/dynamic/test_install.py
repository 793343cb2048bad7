"""A policy installed on a loaded model: each HF block computes exactly the canonical
forward over the kept experts, skipped experts are not computed, removal restores the
original logits bit for bit, and a saved policy comes back with `moekit.load`."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moekit
from moekit.errors import MoekitError
from moekit.methods.dynamic.policy import SkipPolicy, ThresholdPolicy, apply_keep
from moekit.methods.dynamic.install import counting_expert_calls, renormalizes, set_routing_policy

from tests.arch.test_layer import _block_io

POLICIES = [SkipPolicy(beta=0.6), ThresholdPolicy(p=0.5, max_k=2)]


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.parametrize("policy", POLICIES, ids=["skip", "threshold"])
def test_each_block_computes_the_kept_experts_only(family, model, input_ids, policy):
    if family == "llama4":
        with pytest.raises(MoekitError, match="cannot drop experts there"):
            set_routing_policy(model, policy)
        return
    set_routing_policy(model, policy)
    layers, captured = _block_io(model, input_ids)
    for layer in layers:
        hidden, got = captured[layer.index]
        with torch.no_grad():
            index, weights = layer.router.route(layer.router.logits(hidden))
            keep = policy.keep(weights, layer.index)
            index, weights = apply_keep(index, weights, keep, num_experts=layer.num_experts,
                                        renormalize=renormalizes(layer.router.spec))
            expected = layer.routed_forward(hidden, index.clamp(max=layer.num_experts - 1), weights)
            if layer.shared is not None:
                expected = expected + layer.shared.forward(hidden)
        assert (got - expected).abs().max().item() <= 1e-5, f"layer {layer.index}"


class _RowsMultiplied(TorchDispatchMode):
    """Rows every matrix multiply computes: for grouped_mm the rows its groups cover
    (offs[-1]; the kernel never touches rows past it), for mm/addmm/bmm all rows."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = self.plain = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "_grouped_mm" in name:
            offs = args[2] if len(args) > 2 else (kwargs or {}).get("offs")
            self.grouped += int(offs[-1])
        elif name.split(".")[1] in ("mm", "addmm", "bmm"):
            first = args[1] if name.startswith("aten.addmm") else args[0]
            self.plain += first.shape[0] * (first.shape[1] if first.ndim == 3 else 1)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_skipped_experts_are_not_computed(family, model, input_ids, implementation):
    """The experts' kernels multiply fewer rows by exactly the pairs the policy dropped."""
    if family == "llama4":
        pytest.skip("refused above")
    model.set_experts_implementation(implementation)
    if family == "gpt_oss" and implementation == "eager":
        with pytest.raises(MoekitError, match="eager gpt_oss experts cannot skip an expert"):
            set_routing_policy(model, SkipPolicy(beta=1.0))
        return
    top_k = moekit.moe_layers(model)[0].top_k
    measured = []
    for policy in (None, SkipPolicy(beta=1.0)):  # beta 1: the top weight and its exact ties only
        set_routing_policy(model, policy)
        with counting_expert_calls(model) as calls, _RowsMultiplied() as rows, torch.no_grad():
            model(input_ids)
        measured.append((calls, rows))
    (full, full_rows), (skipped, skipped_rows) = measured
    assert full.overall() == top_k and all(v >= 1 for v in skipped.per_layer().values())
    if top_k > 1 and family != "phimoe":  # PhiMoE's sparsemixer often gives both experts exactly 1.0: a tie
        assert skipped.overall() <= 1.05
    dropped_pairs = sum(full.pairs.values()) - sum(skipped.pairs.values())
    # each computed pair goes through two multiplies (gate_up, then down)
    if implementation == "grouped_mm":
        assert full_rows.grouped == 2 * sum(full.pairs.values())
        assert skipped_rows.grouped == 2 * sum(skipped.pairs.values())
    else:
        assert full_rows.plain - skipped_rows.plain == 2 * dropped_pairs


def test_removing_the_policy_restores_the_logits_exactly(family, model, input_ids):
    if family == "llama4":
        pytest.skip("refused")
    original = _logits(model, input_ids)
    set_routing_policy(model, SkipPolicy(beta=0.9))
    changed = _logits(model, input_ids)
    set_routing_policy(model, None)
    assert torch.equal(_logits(model, input_ids), original)
    assert not hasattr(model.config, "moekit_routing_policy")
    if moekit.moe_layers(model)[0].top_k > 1:
        assert not torch.equal(changed, original)


def test_keep_everything_changes_nothing(model, family, input_ids):
    if family == "llama4":
        pytest.skip("refused")
    original = _logits(model, input_ids)
    set_routing_policy(model, SkipPolicy(beta=0.0))
    torch.testing.assert_close(_logits(model, input_ids), original, rtol=0, atol=1e-6)


def test_a_saved_policy_comes_back_with_moekit_load(tmp_path, input_ids):
    model = moekit.load("moekit/ref-fine")
    policy = SkipPolicy(beta={layer.index: 0.2 + 0.1 * layer.index for layer in moekit.moe_layers(model)})
    set_routing_policy(model, policy)
    expected = _logits(model, input_ids)
    moekit.save(model, tmp_path / "out")
    again = moekit.load(str(tmp_path / "out"))
    assert torch.equal(_logits(again, input_ids), expected)
    set_routing_policy(again, None)
    assert not torch.equal(_logits(again, input_ids), expected)


def test_a_per_layer_policy_missing_a_layer_is_refused(model, family):
    if family == "llama4":
        pytest.skip("refused")
    with pytest.raises(MoekitError, match="give a value for every MoE layer"):
        set_routing_policy(model, SkipPolicy(beta={999: 0.5}))


def test_a_refused_policy_leaves_the_installed_one(input_ids):
    model = moekit.load("moekit/ref-coarse")
    set_routing_policy(model, SkipPolicy(beta=0.5))
    expected = _logits(model, input_ids)
    with pytest.raises(MoekitError, match="invalid routing policy: .*beta"):
        set_routing_policy(model, {"kind": "skip", "beta": 2.0})
    with pytest.raises(MoekitError, match="give a value for every MoE layer"):
        set_routing_policy(model, SkipPolicy(beta={0: 0.1}))
    assert torch.equal(_logits(model, input_ids), expected)
    assert model.config.moekit_routing_policy == {"kind": "skip", "beta": 0.5}
