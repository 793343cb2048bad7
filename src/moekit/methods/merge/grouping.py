"""Which experts merge together: groups of experts, each with a centre.

A grouping is a list of groups, each a list of expert ids whose first element is the
centre (the expert whose slot, and by default router row, the merged expert takes).
With group-limited routing every routing group is grouped on its own, with the same
number of merged experts in each, so the result routes like the original.
"""

from __future__ import annotations

import torch
from scipy.cluster.hierarchy import cut_tree, linkage

Grouping = list[list[int]]


def join_nearest(centres: list[int], similarity: torch.Tensor, experts: list[int]) -> Grouping:
    """Every non-centre expert joins the centre it is most similar to."""
    groups = {c: [c] for c in centres}
    for e in experts:
        if e in groups:
            continue
        best = max(centres, key=lambda c: (similarity[e, c].item(), -c))
        groups[best].append(e)
    return [groups[c] for c in centres]


def dominant_groups(usage: torch.Tensor, similarity: torch.Tensor, m: int, experts: list[int]) -> Grouping:
    """M-SMoE (Li et al. 2023, arXiv 2310.01334): the ``m`` most used experts are the
    centres; every other expert joins the centre whose router-logit column is most
    cosine-similar. With ``usage`` = a pruning score this is "groups seeded by the best
    pruning score"."""
    ranked = sorted(experts, key=lambda e: (-usage[e].item(), e))
    return join_nearest(ranked[:m], similarity, experts)


def hierarchical_groups(mean_output: torch.Tensor, usage: torch.Tensor, m: int, experts: list[int]) -> Grouping:
    """HC-SMoE (arXiv 2410.08589): average-linkage hierarchical clustering of the
    experts' mean outputs (Euclidean) into ``m`` clusters; each cluster's most used
    expert is its centre.

    The dendrogram is cut after exactly E − m merges, in the order the clustering made
    them: a cut by distance (``fcluster``'s ``maxclust``) cannot separate merges at equal
    distances — experts no calibration token reached all have a zero mean output — and
    would leave fewer than m clusters."""
    if m == len(experts):
        return [[e] for e in experts]
    points = mean_output[experts].double().numpy()
    labels = cut_tree(linkage(points, method="average", metric="euclidean"), n_clusters=m).ravel()
    clusters: dict[int, list[int]] = {}
    for e, label in zip(experts, labels):
        clusters.setdefault(int(label), []).append(e)
    groups = []
    for members in clusters.values():
        members = sorted(members, key=lambda e: (-usage[e].item(), e))
        groups.append(members)
    return sorted(groups, key=lambda g: g[0])


def per_routing_group(grouper, n_group: int, num_experts: int, m: int) -> Grouping:
    """Apply ``grouper(m_per_group, experts_of_group)`` within each routing group."""
    size, per = num_experts // n_group, m // n_group
    out: Grouping = []
    for g in range(n_group):
        out += grouper(per, list(range(g * size, (g + 1) * size)))
    return out
