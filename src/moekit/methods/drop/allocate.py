"""Choosing per-layer top-k and the layers to drop, from per-layer costs: pure functions."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence


def allocate_top_k(costs: Mapping[int, Sequence[float]], total: int) -> dict[int, int]:
    """The k of each layer, 1 ≤ k_i ≤ K_i, with Σ k_i = ``total``, minimising Σ costs[i][k_i − 1].

    An exact solution of this multiple-choice knapsack by dynamic programming over layers
    and budget (O(L · total · K) steps: 94 layers of k ≤ 8 is a few hundred thousand).
    Ties go to the allocation found first with layers in index order and smaller k first,
    so the result is deterministic. ``costs[i]`` lists layer i's cost at k = 1..K_i.

    Raises:
        ValueError: ``total`` outside [L, Σ K_i].
    """
    layers = sorted(costs)
    low, high = len(layers), sum(len(costs[i]) for i in layers)
    if not low <= total <= high:
        raise ValueError(f"a total top-k of {total} is outside [{low}, {high}] for these layers")
    inf = float("inf")
    best = {0: (0.0, ())}  # budget used -> (cost, ks)
    for i in layers:
        nxt: dict[int, tuple[float, tuple]] = {}
        for used, (cost, ks) in best.items():
            for k, c in enumerate(costs[i], start=1):
                b = used + k
                if b > total:
                    break
                candidate = (cost + float(c), (*ks, k))
                if candidate[0] < nxt.get(b, (inf,))[0]:
                    nxt[b] = candidate
        best = nxt
    return dict(zip(layers, best[total][1], strict=True))


def choose_lowest(scores: Mapping[int, float], count: int, *, allowed: Callable[[list[int]], bool] | None = None
                  ) -> list[int]:
    """The ``count`` indices of lowest score (ties by index), skipping any whose addition
    ``allowed(chosen)`` refuses (a drop the model's config cannot express). Fewer are
    returned when not enough can be chosen."""
    chosen: list[int] = []
    for index in sorted(scores, key=lambda i: (scores[i], i)):
        if len(chosen) == count:
            break
        if allowed is None or allowed(sorted([*chosen, index])):
            chosen.append(index)
    return sorted(chosen)
