"""Routing statistics as pure functions of counts (plain tensors in, numbers out).

Notation: a layer has E experts and chooses k per token; T tokens were routed; S(t) is
the set of experts chosen for token t, g_j(t) the weight expert j gets when chosen, p(t)
the router's distribution over all E experts (softmax of the logits; sigmoid scores
divided by their sum). ``count[j] = |{t : j ∈ S(t)}|`` and Σ_j count[j] = k·T.

Every function here works on sums a streamed pass accumulates batch by batch
(`moekit.analyze.collect`), so a statistic never needs all tokens at once.
"""

from __future__ import annotations

import math

import torch

NEAR_DEAD = 0.1  # an expert is near-dead when it gets under 10% of its fair share (k·T/E)


def load_summary(count: torch.Tensor, gate: torch.Tensor, entropy_sum: float, tokens: int) -> dict:
    """Load of one layer.

    - ``share[j] = count[j] / (k·T)``: expert j's share of the top-k selections;
    - ``gate_share[j] = Σ_t g_j(t) / Σ_t Σ_i g_i(t)``: its share of the gate mass;
    - ``imbalance = max_j count[j] / mean_j count[j]`` (1 = balanced, E/k at worst);
    - ``cv``: coefficient of variation of ``count`` (population std / mean);
    - ``dead``: experts never chosen; ``near_dead``: chosen, but under `NEAR_DEAD` of the
      fair share (share·E < 0.1);
    - ``entropy``: mean over tokens of H(p(t)) in nats, ``entropy_normalized`` the same
      divided by log E (1 = the router spreads every token uniformly).
    """
    count, gate = count.double(), gate.double()
    E = count.numel()
    total = float(count.sum())
    mean = total / E
    share = count / max(total, 1.0)
    relative = share * E
    entropy = entropy_sum / max(tokens, 1)
    return {
        "tokens": int(tokens),
        "count": [int(c) for c in count.tolist()],
        "share": share.tolist(),
        "gate_share": (gate / max(float(gate.sum()), 1e-30)).tolist(),
        "imbalance": float(count.max()) / mean if mean > 0 else 0.0,
        "cv": float(count.std(unbiased=False)) / mean if mean > 0 else 0.0,
        "dead": (count == 0).nonzero().flatten().tolist(),
        "near_dead": ((relative > 0) & (relative < NEAR_DEAD)).nonzero().flatten().tolist(),
        "entropy": entropy,
        "entropy_normalized": entropy / math.log(E) if E > 1 else 0.0,
    }


def coactivation_lift(coactivation: torch.Tensor, tokens: int) -> torch.Tensor:
    """[E, E] lift of choosing i and j together: ``C[i, j] · T / (C[i, i] · C[j, j])`` with
    ``C[i, j]`` the tokens on which both are chosen (diagonal: count[i]). 1 = as often as
    if the two were chosen independently, > 1 coupled, < 1 exclusive; 0 where either
    expert was never chosen. The diagonal is set to 0 (an expert with itself is not a pair)."""
    C = coactivation.double()
    diag = C.diagonal()
    expected = diag[:, None] * diag[None, :] / max(tokens, 1)
    lift = torch.where(expected > 0, C / expected.clamp(min=1e-300), torch.zeros_like(C))
    lift.fill_diagonal_(0.0)
    return lift


def top_pairs(coactivation: torch.Tensor, tokens: int, n: int = 10, min_count: int = 5) -> list[dict]:
    """The ``n`` most coupled pairs i < j by lift, among pairs chosen together on at least
    ``min_count`` tokens (a lift from two tokens says nothing); ties by count."""
    C = coactivation.double()
    lift = coactivation_lift(C, tokens)
    i, j = torch.triu_indices(C.shape[0], C.shape[0], offset=1)
    together = C[i, j]
    keep = together >= min_count
    i, j, together, values = i[keep], j[keep], together[keep], lift[i[keep], j[keep]]
    by_count = together.argsort(descending=True, stable=True)
    order = by_count[values[by_count].argsort(descending=True, stable=True)][:n].tolist()
    return [{"experts": [int(i[o]), int(j[o])], "lift": float(values[o]), "together": int(together[o])}
            for o in order]


def mutual_information(joint: torch.Tensor) -> dict:
    """Mutual information between a token's selections at two MoE layers.

    ``joint[i, j]`` counts, over tokens t, the pairs (i ∈ S_l(t), j ∈ S_l'(t)): each token
    contributes k_l·k_l' pairs. Normalised to a distribution P(i, j), the mutual
    information ``I = Σ P(i,j) log2(P(i,j) / (P(i) P(j)))`` in bits is that of a selection
    drawn uniformly from S_l(t) and one from S_l'(t) of the same token (for k = 1, exactly
    the MI of the two layers' choices). ``normalized`` = I / min(H(P_l), H(P_l')): 0 =
    the next layer's choice is independent of this one's, 1 = determined by it. The
    analysis also applies it to the joint counts of each token's first-ranked experts
    (``joint_top1``), which a uniform draw from the k chosen would dilute."""
    P = joint.double() / max(float(joint.sum()), 1e-300)
    row, col = P.sum(1, keepdim=True), P.sum(0, keepdim=True)
    nz = P > 0
    mi = float((P[nz] * (P[nz] / (row @ col)[nz]).log2()).sum())
    h_row = float(-(row[row > 0] * row[row > 0].log2()).sum())
    h_col = float(-(col[col > 0] * col[col > 0].log2()).sum())
    low = min(h_row, h_col)
    return {"bits": max(mi, 0.0), "normalized": max(mi, 0.0) / low if low > 0 else 0.0,
            "entropy_bits": [h_row, h_col]}


def transition_matrix(joint: torch.Tensor) -> torch.Tensor:
    """P(j at the next layer | i at this one): ``joint`` with each row divided by its sum
    (rows of experts never chosen stay 0)."""
    J = joint.double()
    return J / J.sum(1, keepdim=True).clamp(min=1e-300)


def static_recall(count: torch.Tensor, k: int) -> float:
    """recall@k of the predictor with no input: always the layer's k most loaded experts
    (Σ of their counts / (k·T)); the baseline a real predictor must beat."""
    total = float(count.sum())
    return float(count.double().topk(k).values.sum()) / total if total > 0 else 0.0


def token_lookup_agreement(fit: torch.Tensor, held_out: torch.Tensor, k: int) -> float:
    """Share of routing decisions a token-ID → experts lookup explains, on held-out tokens.

    ``fit[v, j]`` and ``held_out[v, j]`` count the selections of expert j for token id v in
    two disjoint sets of rows. The lookup L(v) is v's k most frequent experts in ``fit``
    (ties to the lower index); a token id absent from ``fit`` gets the k experts most
    chosen overall in ``fit``. The agreement is ``Σ_v Σ_{j ∈ L(v)} held_out[v, j] /
    Σ held_out`` — the mean over held-out tokens of |L(v_t) ∩ S(t)| / k. 1.0 = routing is
    decided by the token id alone (OpenMoE's context independence)."""
    fit, held_out = fit.double(), held_out.double()
    total = float(held_out.sum())
    if total == 0:
        return 0.0
    fallback = fit.sum(0).topk(k).indices
    seen = fit.sum(1) > 0
    chosen = torch.zeros_like(fit, dtype=torch.bool)
    # stable top-k: sort by count descending, then index ascending
    order = torch.sort(fit, dim=1, descending=True, stable=True).indices[:, :k]
    chosen.scatter_(1, order, True)
    unseen = (~seen).nonzero().flatten()
    chosen[unseen] = False
    chosen[unseen[:, None], fallback[None, :]] = True
    return float((held_out * chosen).sum()) / total


def token_concentration(counts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token id v (rows of ``counts[v, j]``, the selections of expert j for v):
    ``concentration`` = the share of v's selections that go to its k most frequent
    experts (1 = v always goes to the same k experts, whatever the context; k/E = spread
    uniformly), and ``entropy`` = the entropy of v's expert distribution / log E. Rows
    with no selection get 0 and 0."""
    counts = counts.double()
    totals = counts.sum(1)
    top = counts.topk(min(k, counts.shape[1]), dim=1).values.sum(1)
    concentration = torch.where(totals > 0, top / totals.clamp(min=1e-300), torch.zeros_like(totals))
    P = counts / totals.clamp(min=1e-300)[:, None]
    logs = torch.where(P > 0, P.log(), torch.zeros_like(P))
    E = counts.shape[1]
    entropy = -(P * logs).sum(1) / (math.log(E) if E > 1 else 1.0)
    return concentration, entropy


def position_divergence(buckets: torch.Tensor) -> torch.Tensor:
    """[B] total-variation distance between each position bucket's expert distribution
    (``buckets[b, j]`` selections of j by tokens in bucket b, normalised per row) and the
    layer's overall one: ½ Σ_j |P_b(j) − P(j)|. 0 = routing does not depend on the
    position in the sequence."""
    B = buckets.double()
    rows = B / B.sum(1, keepdim=True).clamp(min=1e-300)
    overall = B.sum(0) / max(float(B.sum()), 1e-300)
    return 0.5 * (rows - overall).abs().sum(1)


def log_odds_z(counts: torch.Tensor, prior: float = 1000.0) -> torch.Tensor:
    """[D, E] z-scores of expert specificity to each corpus: Monroe, Colaresi & Quinn's
    (2008) log-odds ratio with an informative Dirichlet prior, each corpus against all
    the others pooled.

    ``counts[d, j]``: selections of expert j on corpus d; n_d = Σ_j counts[d, j]. The
    prior is ``α_j = prior · π_j`` with π_j expert j's pooled share, α₀ = Σ α_j = prior.
    For corpus d and the rest r (counts summed over the other corpora)::

        δ_dj = log((y_dj + α_j) / (n_d + α₀ − y_dj − α_j))
             − log((y_rj + α_j) / (n_r + α₀ − y_rj − α_j))
        σ²_dj ≈ 1/(y_dj + α_j) + 1/(y_rj + α_j),   z_dj = δ_dj / σ_dj

    z > 0: j is chosen more on corpus d than elsewhere, measured in standard errors, with
    rare experts shrunk towards no difference (raw ratios would rank an expert chosen
    twice on d and once elsewhere first). Selections of one sequence are not independent,
    so read z as a ranking and a rough scale, not a calibrated test.
    """
    y = counts.double()
    pooled = y.sum(0)
    alpha = prior * pooled / max(float(pooled.sum()), 1e-300)
    alpha = alpha.clamp(min=1e-6)
    a0 = float(alpha.sum())
    n = y.sum(1, keepdim=True)
    rest = pooled[None, :] - y
    n_rest = float(pooled.sum()) - n
    delta = ((y + alpha) / (n + a0 - y - alpha)).log() - ((rest + alpha) / (n_rest + a0 - rest - alpha)).log()
    var = 1.0 / (y + alpha) + 1.0 / (rest + alpha)
    return delta / var.sqrt()


def cluster_order(lift: torch.Tensor) -> list[int]:
    """An order of the experts that puts those chosen together next to each other: average-
    linkage hierarchical clustering on the distance 1 / (1 + lift), leaves in dendrogram
    order (scipy). Used to order co-activation heatmaps so that blocks show."""
    E = lift.shape[0]
    if E < 3:
        return list(range(E))
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    symmetric = 0.5 * (lift + lift.T).double()
    distance = 1.0 / (1.0 + symmetric)
    distance.fill_diagonal_(0.0)
    return [int(i) for i in leaves_list(linkage(squareform(distance.numpy(), checks=False), method="average"))]
