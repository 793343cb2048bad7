"""The pure statistics against their definitions, written out as loops on small inputs."""

from __future__ import annotations

import math

import torch

from moekit.analyze import statistics as st

GEN = torch.Generator().manual_seed(0)


def _selections(T: int, E: int, k: int) -> list[list[int]]:
    return [torch.randperm(E, generator=GEN)[:k].tolist() for _ in range(T)]


def test_load_summary_by_hand():
    count = torch.tensor([6.0, 2.0, 0.0, 0.0, 8.0])  # experts 2 and 3 dead
    gate = torch.tensor([3.0, 1.0, 0.0, 0.0, 4.0])
    out = st.load_summary(count, gate, entropy_sum=2.0, tokens=8)  # k = 2: 16 selections
    assert out["share"] == [6 / 16, 2 / 16, 0.0, 0.0, 8 / 16]
    assert out["gate_share"] == [3 / 8, 1 / 8, 0.0, 0.0, 4 / 8]
    assert math.isclose(out["imbalance"], 8 / (16 / 5))
    mean = 16 / 5
    std = math.sqrt(sum((c - mean) ** 2 for c in [6, 2, 0, 0, 8]) / 5)
    assert math.isclose(out["cv"], std / mean)
    assert out["dead"] == [2, 3] and out["near_dead"] == []
    assert math.isclose(out["entropy_normalized"], (2.0 / 8) / math.log(5))
    # near-dead: chosen but under a tenth of the fair share
    near = st.load_summary(torch.tensor([1.0, 100.0, 99.0]), torch.ones(3), 0.0, 100)
    assert near["near_dead"] == [0] and near["dead"] == []


def test_lift_and_top_pairs_by_hand():
    E, T, k = 6, 300, 2
    sel = _selections(T, E, k)
    sel[:60] = [[0, 1]] * 60  # 0 and 1 coupled
    C = torch.zeros(E, E)
    for s in sel:
        for i in s:
            for j in s:
                C[i, j] += 1
    lift = st.coactivation_lift(C, T)
    for i in range(E):
        for j in range(E):
            expected = 0.0 if i == j else C[i, j].item() * T / (C[i, i].item() * C[j, j].item())
            assert math.isclose(lift[i, j].item(), expected, rel_tol=1e-9)
    top = st.top_pairs(C, T, n=3)
    assert top[0]["experts"] == [0, 1] and top[0]["together"] == int(C[0, 1])
    assert [p["lift"] for p in top] == sorted((p["lift"] for p in top), reverse=True)


def test_mutual_information_by_hand():
    # identical choices (k = 1): MI = H; independent: 0
    joint = torch.diag(torch.tensor([10.0, 30.0, 60.0]))
    p = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    h = float(-(p * p.log2()).sum())
    out = st.mutual_information(joint)
    assert math.isclose(out["bits"], h, rel_tol=1e-9) and math.isclose(out["normalized"], 1.0)
    independent = torch.outer(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0, 4.0]))
    assert st.mutual_information(independent)["bits"] < 1e-12
    # a general joint, against the formula with loops
    J = torch.rand(4, 5, generator=GEN, dtype=torch.float64) * 10
    P = J / J.sum()
    expected = sum(P[i, j] * math.log2(P[i, j] / (P[i].sum() * P[:, j].sum())) for i in range(4) for j in range(5))
    assert math.isclose(st.mutual_information(J)["bits"], float(expected), rel_tol=1e-9)


def test_token_lookup_agreement_by_hand():
    k = 2
    fit = torch.tensor([[5.0, 3, 0, 0], [0, 0, 2, 2], [0, 0, 0, 0]])  # token 1 ties -> experts 2, 3; 2 unseen
    test = torch.tensor([[4.0, 1, 1, 0], [0, 1, 1, 2], [3, 0, 3, 0]])
    # lookup: 0 -> {0,1}; 1 -> {2,3}; 2 (unseen) -> overall top-2 of fit: 0 (5) and 1 (3)
    hits = (4 + 1) + (1 + 2) + (3 + 0)
    assert math.isclose(st.token_lookup_agreement(fit, test, k), hits / float(test.sum()))


def test_concentration_and_position_by_hand():
    counts = torch.tensor([[6.0, 2, 2, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    conc, ent = st.token_concentration(counts, 2)
    assert conc.tolist() == [0.8, 0.5, 0.0]
    assert math.isclose(ent[1].item(), 1.0) and ent[2].item() == 0.0
    buckets = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    assert st.position_divergence(buckets).tolist() == [0.5, 0.5]
    assert st.position_divergence(torch.tensor([[1.0, 3.0], [2.0, 6.0]])).abs().max() < 1e-12


def test_log_odds_matches_monroe_formula():
    y = torch.tensor([[50.0, 10, 5, 35], [20, 40, 5, 35], [30, 30, 30, 10]], dtype=torch.float64)
    prior = 100.0
    z = st.log_odds_z(y, prior)
    pooled = y.sum(0)
    for d in range(3):
        for j in range(4):
            a = prior * pooled[j] / pooled.sum()
            ydj, yrj = y[d, j], pooled[j] - y[d, j]
            nd, nr = y[d].sum(), pooled.sum() - y[d].sum()
            delta = math.log((ydj + a) / (nd + prior - ydj - a)) - math.log((yrj + a) / (nr + prior - yrj - a))
            sigma = math.sqrt(1 / (ydj + a) + 1 / (yrj + a))
            assert math.isclose(z[d, j].item(), delta / sigma, rel_tol=1e-9)
    assert z[0, 0] > 0 and z[1, 1] > 0 and z[2, 2] > 0
    # shrinkage: an expert chosen twice on d and never elsewhere ranks below a large, steady difference
    small = st.log_odds_z(torch.tensor([[2.0, 600, 400], [0, 400, 600]]))
    assert small[0, 1] > small[0, 0]


def test_cluster_order_puts_blocks_together():
    E = 6
    lift = torch.ones(E, E)
    for block in ([0, 3, 5], [1, 2, 4]):
        for i in block:
            for j in block:
                lift[i, j] = 5.0
    order = st.cluster_order(lift)
    assert sorted(order) == list(range(E))
    assert {frozenset(order[:3]), frozenset(order[3:])} == {frozenset([0, 3, 5]), frozenset([1, 2, 4])}
