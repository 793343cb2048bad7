"""`route` against brute-force statements of each routing rule."""

from __future__ import annotations

import itertools

import torch

from moekit.arch.routing import RoutingSpec, route

GEN = torch.Generator().manual_seed(0)


def test_group_limited_routing_by_enumeration():
    """Chosen experts are the best top_k among the experts of the best topk_group groups,
    groups ranked by the sum of their two best selection scores."""
    logits = torch.randn(50, 12, generator=GEN)
    bias = torch.randn(12, generator=GEN) * 0.1
    spec = RoutingSpec(top_k=3, scoring="sigmoid", n_group=4, topk_group=2, group_score="top2_sum",
                       norm_topk_prob=True, routed_scaling_factor=2.0)
    index, weights = route(logits, spec, bias)
    scores = logits.sigmoid()
    choice = scores + bias
    for t in range(50):
        group_rank = [choice[t, g * 3:(g + 1) * 3].topk(2).values.sum().item() for g in range(4)]
        best_groups = max(itertools.combinations(range(4), 2), key=lambda gs: sum(group_rank[g] for g in gs))
        allowed = [e for g in best_groups for e in range(g * 3, g * 3 + 3)]
        expected = sorted(sorted(allowed, key=lambda e: -choice[t, e].item())[:3])
        assert sorted(index[t].tolist()) == expected
        chosen = scores[t, index[t]]
        assert torch.allclose(weights[t], 2.0 * chosen / chosen.sum())


def test_topk_before_softmax():
    logits = torch.randn(20, 8, generator=GEN)
    index, weights = route(logits, RoutingSpec(top_k=2, topk_before_scoring=True))
    top = logits.topk(2).values
    assert torch.equal(index, logits.topk(2).indices)
    assert torch.allclose(weights, torch.exp(top) / torch.exp(top).sum(-1, keepdim=True))


def test_sparsemixer_weights_are_softmax_over_near_best():
    logits = torch.tensor([[3.0, 2.99, 0.0, -1.0]])
    index, weights = route(logits, RoutingSpec(top_k=2, scoring="sparsemixer", jitter_eps=0.01))
    assert index.tolist() == [[0, 1]]
    # expert 1 is within 2·eps (relative) of expert 0, so the first weight shares with it
    e = torch.exp(torch.tensor([3.0, 2.99]))
    assert torch.allclose(weights[0, 0], e[0] / e.sum())
    # the second choice competes with nobody left within 2·eps of it
    assert torch.allclose(weights[0, 1], torch.tensor(1.0))


def test_least_kept_is_the_smallest_count_keep_experts_accepts():
    """Brute force: for each routing, the smallest even-per-group count that `keep_experts`
    accepts on a tiny model of that family is what `least_kept` says."""
    import moekit
    from moekit.errors import MoekitError
    from moekit.zoo.tiny import tiny_model

    for family in ("mixtral", "deepseek_v2", "deepseek_v3"):
        accepted = []
        for keep in range(1, 9):
            model = tiny_model(family)
            layers = moekit.moe_layers(model)
            groups, size = layers[0].router.spec.n_group, layers[0].num_experts // layers[0].router.spec.n_group
            if keep % groups:
                continue
            ids = [g * size + j for g in range(groups) for j in range(keep // groups)]
            try:
                moekit.keep_experts(model, {layer.index: ids for layer in layers})
                accepted.append(keep)
            except MoekitError:
                pass
        assert min(accepted) == layers[0].router.spec.least_kept(), family
