"""keep_experts edits every family consistently; plain transformers reloads the result."""

from __future__ import annotations


import pytest
import torch

import moekit
from moekit.arch.edit import experts_per_layer
from moekit.errors import MoekitError
from moekit.zoo.tiny import tiny_model
from tests.reload import edit_save_reload

KEEP = [0, 3, 5, 6]  # two from each half, so group-limited routing (2 groups of 4) stays valid
IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def pruned_and_reloaded(tmp_path_factory):
    """Prune every family to KEEP, save, and reload all of them in one plain process."""
    return edit_save_reload(
        tmp_path_factory.mktemp("pruned"),
        lambda model: moekit.keep_experts(model, {layer.index: KEEP for layer in moekit.moe_layers(model)}), IDS)


def test_save_then_plain_reload_gives_equal_logits(family, pruned_and_reloaded):
    in_memory, reloaded = pruned_and_reloaded
    assert (in_memory[family] - reloaded[family]).abs().max().item() <= 1e-6


def test_keep_slices_every_tensor_consistently(model):
    before = {layer.index: layer for layer in moekit.moe_layers(model)}
    snapshot = {
        i: dict(router=l.router.weight.clone(), gate=l.experts.gate.clone(), up=l.experts.up.clone(),
                down=l.experts.down.clone(),
                bias=None if l.router.bias is None else l.router.bias.clone(),
                corr=None if l.router.correction_bias is None else l.router.correction_bias.clone(),
                down_bias=None if l.experts.down_bias is None else l.experts.down_bias.clone())
        for i, l in before.items()
    }
    moekit.keep_experts(model, {i: KEEP for i in before})
    ids = torch.tensor(KEEP)
    for layer in moekit.moe_layers(model):
        s = snapshot[layer.index]
        assert layer.num_experts == len(KEEP)
        assert torch.equal(layer.router.weight, s["router"][ids])
        assert torch.equal(layer.experts.gate, s["gate"][ids])
        assert torch.equal(layer.experts.up, s["up"][ids])
        assert torch.equal(layer.experts.down, s["down"][ids])
        for key, view in (("bias", layer.router.bias), ("corr", layer.router.correction_bias),
                          ("down_bias", layer.experts.down_bias)):
            assert (view is None) == (s[key] is None)
            if view is not None:
                assert torch.equal(view, s[key][ids])
    assert getattr(model.config, "num_experts", getattr(model.config, "num_local_experts", None)) == len(KEEP)


def test_pruned_layer_still_matches_hf_block(model, input_ids):
    """Counters and config are updated, so HF's own block computes what the view computes."""
    moekit.keep_experts(model, {layer.index: KEEP for layer in moekit.moe_layers(model)})
    from tests.arch.test_layer import _block_io

    layers, captured = _block_io(model, input_ids)
    for layer in layers:
        hidden, expected = captured[layer.index]
        with torch.no_grad():
            assert (layer.forward(hidden)[0] - expected).abs().max().item() <= 1e-5


def test_top_level_counters_follow(model):
    moekit.keep_experts(model, {layer.index: KEEP for layer in moekit.moe_layers(model)})
    for module in model.modules():
        for name in ("num_experts", "num_local_experts"):
            value = getattr(module, name, None)
            if isinstance(value, int):
                assert value == len(KEEP), f"{type(module).__name__}.{name}"


def test_keeping_everything_changes_nothing(model):
    before = _logits(model)
    moekit.keep_experts(model, {layer.index: list(range(8)) for layer in moekit.moe_layers(model)})
    assert torch.equal(_logits(model), before)


@pytest.mark.parametrize(
    "keep, message",
    [
        ({"moe": []}, "empty"),
        ({"moe": [0, 1, 99]}, "out of range"),
        ({"moe": [0, 0, 1]}, "duplicates"),
        ({"moe": [4]}, "fewer than top-k"),
        ({"dense": [0, 1]}, "has no routed experts"),
    ],
)
@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral", "qwen2_moe"])
def test_bad_keep_lists_are_refused_and_change_nothing(model, keep, message):
    moe = moekit.moe_layers(model)[0].index
    dense = [info.index for info in moekit.decoder_layers(model) if not info.is_moe] or [99]
    target = {"moe": moe, "dense": dense[0]}
    request = {target[key]: ids for key, ids in keep.items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MoekitError, match=message):
        moekit.keep_experts(model, request)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "deepseek_v2"])
def test_group_limited_routing_needs_balanced_groups(model):
    layer = moekit.moe_layers(model)[0].index
    with pytest.raises(MoekitError, match="same number from every group"):
        moekit.keep_experts(model, {layer: [0, 1, 2, 4]})


def test_non_uniform_counts_are_refused_by_the_standard_save(tmp_path):
    model = tiny_model("mixtral")
    moekit.keep_experts(model, {0: [0, 1, 2, 3]})
    assert experts_per_layer(model) == {0: 4, 1: 8, 2: 8}
    with pytest.raises(MoekitError, match="different numbers of experts per layer"):
        moekit.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir())  # no partial folder either


def test_save_never_writes_into_an_existing_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(MoekitError, match="already exists"):
        moekit.save(tiny_model("olmoe"), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_set_expert_weights_writes_through_the_view(family):
    model = tiny_model(family)
    layer = moekit.moe_layers(model)[0]
    I, H = layer.experts.intermediate_size, layer.experts.hidden_size
    gate, up, down = torch.randn(I, H), torch.randn(I, H), torch.randn(H, I)
    moekit.set_expert_weights(model, layer.index, 5, gate=gate, up=up, down=down)
    fresh = moekit.moe_layers(model)[0]
    assert torch.equal(fresh.experts.gate[5], gate)
    assert torch.equal(fresh.experts.up[5], up)
    assert torch.equal(fresh.experts.down[5], down)
    with pytest.raises(MoekitError, match="expected shape"):
        moekit.set_expert_weights(model, layer.index, 5, gate=torch.randn(I + 1, H))
    moekit.set_router_weights(model, layer.index, 2, weight=torch.ones(H))
    assert torch.equal(moekit.moe_layers(model)[0].router.weight[2], torch.ones(H))


def test_allowed_mask_predicts_the_pruned_layer(family, input_ids):
    """forward(allowed=S) on the original layer equals the layer after keep_experts(S):
    the objective reconstruction search optimises is what the pruned model computes."""
    model = tiny_model(family)
    from tests.arch.test_layer import _block_io

    layers, captured = _block_io(model, input_ids)
    allowed = torch.zeros(8, dtype=torch.bool)
    allowed[KEEP] = True
    predicted = {}
    with torch.no_grad():
        for layer in layers:
            predicted[layer.index] = layer.forward(captured[layer.index][0], allowed=allowed)[0]
    moekit.keep_experts(model, {layer.index: KEEP for layer in layers})
    for layer in moekit.moe_layers(model):
        with torch.no_grad():
            actual = layer.forward(captured[layer.index][0])[0]
        assert (actual - predicted[layer.index]).abs().max().item() <= 1e-5, layer.index
