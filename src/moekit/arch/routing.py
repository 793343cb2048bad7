"""Router semantics as explicit data, and the one routing function every family shares.

Every Hugging Face MoE router is a point in a small space of choices: how logits become
scores (softmax, sigmoid, PhiMoE's sparsemixer), whether top-k is taken over the logits
before scoring (GPT-OSS, Granite, Llama-4) or over the scores after, whether a
selection-only bias shifts the choice (DeepSeek-V3, GLM-4, ERNIE), group-limited routing,
renormalisation of the chosen weights, and a final scaling factor. `RoutingSpec` names
those choices; `route` implements all of them once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Scoring = Literal["softmax", "sigmoid", "sparsemixer"]
GroupScore = Literal["max", "top2_sum"]


@dataclass(frozen=True)
class RoutingSpec:
    """How one family turns router logits into (top_k_index, top_k_weights).

    Attributes:
        top_k: experts chosen per token.
        scoring: map from logits to scores.
        topk_before_scoring: pick the top-k logits first, then score only those k
            (softmax over k for GPT-OSS and Granite, element-wise sigmoid for Llama-4).
        norm_topk_prob: divide the chosen weights by their sum.
        norm_min: lower bound of that sum (ERNIE's ``moe_norm_min``; tiny elsewhere).
        routed_scaling_factor: multiplies the final weights (DeepSeek, GLM).
        n_group, topk_group: group-limited routing; only the best ``topk_group`` of
            ``n_group`` contiguous expert groups may be chosen. ``n_group == 1`` is off.
        group_score: how a group is ranked: its best score (DeepSeek-V2) or the sum of
            its two best (DeepSeek-V3, GLM-4).
        jitter_eps: PhiMoE sparsemixer's masking threshold.
        weight_on_input: the weight scales the expert's *input* (Llama-4), not its output.
    """

    top_k: int
    scoring: Scoring = "softmax"
    topk_before_scoring: bool = False
    norm_topk_prob: bool = False
    norm_min: float = 0.0
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: GroupScore = "max"
    jitter_eps: float = 0.0
    weight_on_input: bool = False

    @property
    def grouped(self) -> bool:
        return self.n_group > 1

    def kept_count_problem(self, per_group: int) -> str | None:
        """Why group-limited routing cannot work with ``per_group`` experts left in every
        group, or None when it can (always None without groups)."""
        if not self.grouped:
            return None
        if self.group_score == "top2_sum" and per_group < 2:
            return (f"the router ranks its {self.n_group} expert groups by their two best experts; keep at least "
                    f"2 per group ({2 * self.n_group} in all)")
        if self.topk_group * per_group < self.top_k:
            need = -(-self.top_k // self.topk_group)
            return (f"{self.topk_group} chosen groups x {per_group} experts cannot supply top-k = {self.top_k}; "
                    f"keep at least {need} per group ({need * self.n_group} in all)")
        return None

    def least_kept(self) -> int:
        """The fewest experts a layer routed this way can keep: at least top-k, the same
        number from every group, and no `kept_count_problem`."""
        per_group = 1
        while per_group * self.n_group < self.top_k or self.kept_count_problem(per_group):
            per_group += 1
        return per_group * self.n_group


def router_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits [T, E] from hidden [T, H], weight [E, H] and optional bias [E]."""
    return torch.nn.functional.linear(hidden, weight, bias)


def scores_from_logits(logits: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """Per-expert probabilities p_j(x) [T, E] over all experts.

    For families that choose among raw logits (top-k before scoring) this is the softmax
    over all logits: the distribution the router expresses, used by statistics such as
    soft frequency. It is not what the chosen experts are weighted with.
    """
    if spec.scoring == "sigmoid" and not spec.topk_before_scoring:
        return logits.float().sigmoid()
    return logits.float().softmax(dim=-1)


def route(
    logits: torch.Tensor,
    spec: RoutingSpec,
    correction_bias: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose experts for each token.

    Args:
        logits: [T, E] router logits (router bias already added).
        spec: the family's routing semantics.
        correction_bias: [E] added to the scores for *selection only*.
        allowed: [E] bool; experts outside it are treated as removed — never chosen and
            absent from every normalisation. This is exactly how the layer routes after
            `moekit.keep_experts` keeps the allowed experts (groups stay contiguous as
            long as every group keeps the same number).

    Returns:
        top_k_index [T, k] (int64) and top_k_weights [T, k] (float32): the weight each
        chosen expert's contribution is multiplied by.
    """
    logits = logits.float()
    if allowed is not None and (spec.scoring != "sigmoid" or spec.topk_before_scoring):
        logits = logits.masked_fill(~allowed, float("-inf"))
    if spec.scoring == "sparsemixer":
        index, weights = _sparsemixer(logits, spec.top_k, spec.jitter_eps)
    elif spec.topk_before_scoring:
        top_logits, index = logits.topk(spec.top_k, dim=-1)
        weights = top_logits.softmax(dim=-1) if spec.scoring == "softmax" else top_logits.sigmoid()
    else:
        scores = logits.softmax(dim=-1) if spec.scoring == "softmax" else logits.sigmoid()
        choice = scores if correction_bias is None else scores + correction_bias.float()
        if allowed is not None:
            choice = choice.masked_fill(~allowed, float("-inf"))
        if spec.grouped:
            choice = _mask_groups(choice, spec)
        index = choice.topk(spec.top_k, dim=-1).indices
        weights = scores.gather(1, index)
    if spec.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=max(spec.norm_min, 1e-20))
    return index, weights * spec.routed_scaling_factor


def _mask_groups(choice: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """Keep only the experts of each token's best ``topk_group`` groups (others -inf)."""
    tokens, experts = choice.shape
    grouped = choice.view(tokens, spec.n_group, experts // spec.n_group)
    if spec.group_score == "top2_sum":
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    best = group_scores.topk(spec.topk_group, dim=-1).indices
    allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    allowed = allowed.unsqueeze(-1).expand_as(grouped).reshape(tokens, experts)
    return choice.masked_fill(~allowed, float("-inf"))


def _sparsemixer(logits: torch.Tensor, top_k: int, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's inference-time sparsemixer (Liu et al. 2024, arXiv 2409.12136).

    The k-th choice is the k-th largest logit; its weight is a softmax over the logits
    that lie within a relative distance of 2·jitter_eps of it, earlier choices excluded.
    """
    remaining = logits.clone()
    indices, weights = [], []
    for _ in range(top_k):
        best, best_index = remaining.max(dim=-1, keepdim=True)
        factor = logits.abs().clamp(min=best)
        too_far = (best - logits) / factor > 2 * jitter_eps
        gates = remaining.masked_fill(too_far, float("-inf")).softmax(dim=-1)
        indices.append(best_index)
        weights.append(gates.gather(1, best_index))
        remaining = remaining.scatter(1, best_index, float("-inf"))
    return torch.cat(indices, dim=-1), torch.cat(weights, dim=-1)
