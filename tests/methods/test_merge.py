"""Merging: alignment preserves functions, identical experts merge exactly, HC-SMoE
grouping equals a hand-run clustering, merged checkpoints reload in plain transformers."""

from __future__ import annotations


import pytest
import torch

import moekit
from moekit.calib.calibrate import calibrate
from moekit.errors import MoekitError
from moekit.methods.merge.align import match, neuron_features, permute
from moekit.methods.merge.grouping import hierarchical_groups
from moekit.recipe import Recipe
from moekit.zoo.tiny import tiny_model
from tests.reload import edit_save_reload

IDS = torch.randint(3, 128, (6, 16), generator=torch.Generator().manual_seed(0))
EVAL_IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(5))


def _stats(model, step):
    return calibrate(model, IDS, statistics=step.needs(), hidden_sample=step.hidden_sample(), progress=False)


def _step(**kw):
    return Recipe.from_dict({"steps": [{"type": "merge", "keep": 4, **kw}]}).steps[0]


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_aligned_expert_computes_the_same_function(family):
    layer = moekit.moe_layers(tiny_model(family))[0]
    e = layer.experts
    original = {n: getattr(e, n)[3].detach().clone() if getattr(e, n) is not None else None
                for n in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")}
    perm = torch.randperm(e.intermediate_size, generator=torch.Generator().manual_seed(0))
    shuffled = permute(original, perm)
    x = torch.randn(10, e.hidden_size)
    with torch.no_grad():
        expected = e.expert_forward(3, x)
        for n, t in shuffled.items():
            if t is not None:
                getattr(e, n)[3].copy_(t)
        assert torch.allclose(e.expert_forward(3, x), expected, atol=1e-6)
    # and matching recovers the permutation: aligning the shuffled copy restores the original
    back = match(neuron_features(original["gate"], original["up"], original["down"]),
                 neuron_features(shuffled["gate"], shuffled["up"], shuffled["down"]))
    assert torch.equal(permute(shuffled, back)["gate"], original["gate"])


def test_merging_identical_experts_is_exact(input_ids):
    """Expert 5 is expert 2 with its neurons shuffled and is never routed: a uniform
    average of the aligned pair is expert 2 itself, so the layer is unchanged."""
    model = tiny_model("mixtral")
    layer = moekit.moe_layers(model)[0]
    e = layer.experts
    hidden = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    hidden[:, 0] = 10.0 + hidden[:, 0].abs()
    with torch.no_grad():
        perm = torch.randperm(e.intermediate_size, generator=torch.Generator().manual_seed(1))
        e.gate[5].copy_(e.gate[2][perm])
        e.up[5].copy_(e.up[2][perm])
        e.down[5].copy_(e.down[2][:, perm])
        layer.router.weight[5] = 0.0
        layer.router.weight[5, 0] = -100.0  # logit <= -1000 on these inputs: never chosen
        before, _, index, _ = layer.forward(hidden)
    assert not (index == 5).any()
    groups = [[2, 5]] + [[i] for i in (0, 1, 3, 4, 6, 7)]
    step = _step(keep=7, weights="uniform", router="centre")
    step._merge_group(model, layer, groups[0], torch.ones(8), None)
    moekit.keep_experts(model, {layer.index: [0, 1, 2, 3, 4, 6, 7]})
    with torch.no_grad():
        after = moekit.moe_layers(model)[0].forward(hidden)[0]
    assert torch.allclose(after, before, atol=1e-5)


def _average_linkage_by_hand(points: torch.Tensor, m: int) -> set[frozenset[int]]:
    clusters = [[i] for i in range(len(points))]
    dist = torch.cdist(points.double(), points.double(), compute_mode="donot_use_mm_for_euclid_dist")
    while len(clusters) > m:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = dist[clusters[a]][:, clusters[b]].mean().item()
                if best is None or d < best[0]:
                    best = (d, a, b)
        _, a, b = best
        clusters[a] = clusters[a] + clusters.pop(b)
    return {frozenset(c) for c in clusters}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hcsmoe_grouping_equals_hand_run_average_linkage(seed):
    points = torch.randn(10, 6, generator=torch.Generator().manual_seed(seed))
    usage = torch.rand(10, generator=torch.Generator().manual_seed(seed + 10))
    groups = hierarchical_groups(points, usage, 4, list(range(10)))
    assert {frozenset(g) for g in groups} == _average_linkage_by_hand(points, 4)
    for g in groups:  # the centre is the most used member
        assert usage[g[0]] == usage[g].max()


@pytest.fixture(scope="module")
def merged_and_reloaded(tmp_path_factory):
    step = _step(grouping="score", router="fit", align=True)
    return edit_save_reload(tmp_path_factory.mktemp("merged"), lambda model: step.apply(model, _stats(model, step)),
                            EVAL_IDS)


def test_merged_checkpoints_reload_in_plain_transformers(family, merged_and_reloaded):
    in_memory, reloaded = merged_and_reloaded
    assert (in_memory[family] - reloaded[family]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("grouping", ["msmoe", "hcsmoe", "score"])
@pytest.mark.parametrize("router", ["centre", "mean", "fit"])
def test_every_variant_really_shrinks(grouping, router):
    model = tiny_model("qwen2_moe")
    step = _step(grouping=grouping, router=router)
    before = moekit.summarize(model).routed_params
    report = step.apply(model, _stats(model, step))
    assert moekit.summarize(model).routed_params * 2 == before
    for groups in report["groups"].values():
        assert sorted(e for g in groups for e in g) == list(range(8)) and len(groups) == 4


def test_groups_stay_inside_routing_groups():
    model = tiny_model("deepseek_v3")
    step = _step(grouping="hcsmoe")
    report = step.apply(model, _stats(model, step))
    for groups in report["groups"].values():
        for g in groups:
            assert len({e // 4 for e in g}) == 1


def test_missing_statistics_and_bad_sizes():
    model = tiny_model("mixtral")
    step = _step(grouping="hcsmoe")
    stats = calibrate(model, IDS, statistics=["frequency"], progress=False)
    with pytest.raises(MoekitError, match="mean_output"):
        step.apply(model, stats)
    from moekit.recipe.recipe import model_info
    from moekit.zoo.tiny import tiny_config

    info = model_info(tiny_config("mixtral"))
    with pytest.raises(MoekitError, match="merge: keep=9 but the model has only 8 experts"):
        _step(keep=9).check(info)
    with pytest.raises(MoekitError, match="merge: keeping 8 of 8 experts removes nothing"):
        _step(keep=8).check(info)
    with pytest.raises(MoekitError, match="fewer than top-k"):
        _step(keep=1).check(info)


def test_hcsmoe_with_tied_distances_still_follows_the_clustering():
    """Merges at equal distances (here two pairs 1.0 apart) cannot be told apart by a cut
    at a distance: one cut leaves 3 clusters where 4 were asked. Cutting after exactly
    E − m merges gives what the hand-run clustering gives (one pair merged, either, by the
    tie), and never splits the tight cluster of the first four experts."""
    points = torch.tensor([[0, 0], [0.01, 0], [0.03, 0], [0.06, 0], [10, 0], [11, 0], [0, 10], [0, 11]],
                          dtype=torch.float64)
    usage = torch.arange(8, 0, -1).float()
    groups = {frozenset(g) for g in hierarchical_groups(points, usage, 4, list(range(8)))}
    hand = _average_linkage_by_hand(points, 4)
    assert hand == {frozenset({0, 1, 2, 3}), frozenset({4, 5}), frozenset({6}), frozenset({7})}
    assert groups in (hand, {frozenset({0, 1, 2, 3}), frozenset({6, 7}), frozenset({4}), frozenset({5})})
    dead = torch.zeros(6, 3, dtype=torch.float64)  # 4 experts no token reached, all at the origin
    dead[4:] = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert len(hierarchical_groups(dead, torch.ones(6), 5, list(range(6)))) == 5
