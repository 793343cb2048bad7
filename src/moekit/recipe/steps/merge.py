"""The ``merge`` step: E experts → M real experts per layer, router rows included."""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from moekit.arch.edit import keep_experts, set_expert_weights, set_router_weights
from moekit.methods.merge.align import match, neuron_features, permute
from moekit.methods.merge.average import fitted_router_row, weighted_mean
from moekit.methods.merge.grouping import dominant_groups, hierarchical_groups, per_routing_group
from moekit.methods.prune.criteria import CRITERIA, score
from moekit.recipe.step import register_step
from moekit.recipe.steps import refit
from moekit.recipe.steps.reduce import ExpertReduction

_EXPERT_TENSORS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


@register_step
class Merge(ExpertReduction):
    """Merge each layer's experts into ``keep`` (or remove the fraction ``remove``).

    grouping: ``msmoe`` (most used experts are centres, others join the most similar
        router-logit column), ``hcsmoe`` (average-linkage clustering of mean outputs),
        ``score`` (centres = best by ``score_criterion``, others join as in msmoe).
    align: permute members' neurons onto the centre's before averaging.
    weights: ``frequency``, ``reap`` (saliency) or ``uniform`` averaging weights.
    router: the merged row is the ``centre``'s, the usage-weighted ``mean`` of the
        members', or ``fit``ted by least squares to the members' log-sum-exp logit.
    refit: afterwards re-fit the merged experts' down projections so the layer
        reproduces the original one on calibration inputs (`moekit.methods.refit`).

    The defaults (``hcsmoe``, aligned, frequency weights, ``mean`` router) are the best
    combination measured on both reference models (`benchmarks/compression.py`).
    """

    name = "merge"
    type: Literal["merge"] = "merge"
    grouping: Literal["msmoe", "hcsmoe", "score"] = "hcsmoe"
    score_criterion: Literal["frequency", "soft_frequency", "ean", "man", "msan", "reap"] = "reap"
    align: bool = True
    weights: Literal["frequency", "reap", "uniform"] = "frequency"
    router: Literal["centre", "mean", "fit"] = "mean"
    samples: int = Field(default=1024, ge=16)

    def needs(self) -> set[str]:
        wanted = {"frequency"}
        wanted |= {"mean_output"} if self.grouping == "hcsmoe" else {"logit_similarity"}
        if self.grouping == "score":
            wanted |= set(CRITERIA[self.score_criterion][1])
        if self.weights == "reap":
            wanted.add("reap")
        if self.router == "fit":
            wanted.add("hidden_sample")
        return wanted | self.refit_needs()

    def hidden_sample(self) -> int:
        return max(self.samples if self.router == "fit" else 0, self.refit_samples if self.refit else 0)

    def groups(self, layer, stats) -> list[list[int]]:
        s = stats[layer.index]
        if self.grouping == "hcsmoe":
            grouper = partial(_hc, s["mean_output"], s["frequency"])
        else:
            usage = s["frequency"] if self.grouping == "msmoe" else score(self.score_criterion, s)
            grouper = partial(_dominant, usage, s["logit_similarity"])
        spec = layer.router.spec
        return per_routing_group(grouper, spec.n_group, layer.num_experts, self.kept_per_layer(layer.num_experts))

    @torch.no_grad()
    def apply_layer(self, model: nn.Module, layer, stats, *, plan=None, on_progress=None) -> dict:
        stats.require(self.needs(), f"merge (grouping={self.grouping}, weights={self.weights}, router={self.router})")
        groups = self.groups(layer, stats)
        s = stats[layer.index]
        goal = refit.target(layer, stats, self.refit_samples) if self.refit else None
        hidden = stats.hidden_inputs(layer.index, self.samples) if self.router == "fit" else None
        weight_of = {"frequency": s["frequency"], "reap": s.get("reap"),
                     "uniform": torch.ones_like(s["frequency"])}[self.weights]
        for group in groups:
            if len(group) > 1:
                self._merge_group(model, layer, group, weight_of, hidden)
        keep_experts(model, {layer.index: sorted(g[0] for g in groups)})
        result = {"groups": groups}
        if goal is not None:
            result["refit"] = refit.refit_layer(model, layer, goal, ridge=self.refit_ridge, on_progress=on_progress)
        return result

    def _merge_group(self, model, layer, group, weight_of, hidden: torch.Tensor | None) -> None:
        """Merge ``group`` into its first expert; ``hidden`` [m, H] feeds the fitted router."""
        experts, router = layer.experts, layer.router
        members = [{name: _get(experts, name, e) for name in _EXPERT_TENSORS} for e in group]
        if self.align:
            centre = neuron_features(members[0]["gate"], members[0]["up"], members[0]["down"])
            for i in range(1, len(members)):
                m = members[i]
                members[i] = permute(m, match(centre, neuron_features(m["gate"], m["up"], m["down"])))
        w = weight_of[group].double()
        merged = {name: weighted_mean([m[name] for m in members], w) for name in _EXPERT_TENSORS}
        set_expert_weights(model, layer.index, group[0], **merged)

        rows = router.weight[group].detach()
        new = {}
        if self.router == "mean":
            new["weight"] = weighted_mean(list(rows), w)
            if router.bias is not None:
                new["bias"] = weighted_mean(list(router.bias[group].detach()), w)
        elif self.router == "fit":
            hidden = hidden.to(rows.dtype)
            logits = router.logits(hidden)[:, group]
            row, bias = fitted_router_row(hidden, logits, with_bias=router.bias is not None)
            new["weight"] = row.to(rows.dtype)
            if router.bias is not None:
                new["bias"] = torch.tensor(bias, dtype=router.bias.dtype)
        if self.router != "centre" and router.correction_bias is not None:
            new["correction_bias"] = weighted_mean(list(router.correction_bias[group].detach()), w)
        if new:
            set_router_weights(model, layer.index, group[0], **new)


def _get(experts, name: str, expert: int) -> torch.Tensor | None:
    tensor = getattr(experts, name)
    return None if tensor is None else tensor[expert].detach().clone()


def _dominant(usage, similarity, m, experts):
    return dominant_groups(usage, similarity, m, experts)


def _hc(mean_output, usage, m, experts):
    return hierarchical_groups(mean_output, usage, m, experts)
