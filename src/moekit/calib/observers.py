"""Per-expert statistics, accumulated batch by batch on the canonical view of one layer.

Notation (``../shared/METHODS.md``): x a token entering the MoE block, p_j(x) the router
probability of expert j, g_j(x) the weight j gets when chosen, f_j(x) its (unweighted)
output, X_j the tokens routed to j. Each observer reads a `BatchContext`, whose routing
and routed expert outputs are computed once and shared by every observer that needs
them; ``mean_output`` alone runs every expert on every token, so it is computed only
when asked for.

For Llama-4, whose weight scales the expert *input*, f_j(x) is the expert applied to
the unscaled x.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from moekit.arch.layer import MoELayer

if TYPE_CHECKING:
    from moekit.distributed.world import World

# name -> (what it is, needs routed outputs)
STATISTICS: dict[str, str] = {
    "frequency": "[E] top-k selections of each expert (|X_j|); also counts tokens",
    "soft_frequency": "[E] Σ_x p_j(x) over all tokens (SEER-MoE)",
    "reap": "[E] mean over X_j of g_j(x)·‖f_j(x)‖₂ (REAP, arXiv 2510.13999)",
    "ean": "[E] Σ over X_j of ‖f_j(x)‖₂ (expert activation norm)",
    "man": "[E] mean over X_j of ‖f_j(x)‖₂",
    "msan": "[E] mean over X_j of ‖f_j(x)‖₂²",
    "peak": "[E] largest |element| of f_j(x) over X_j (finds 'super experts')",
    "coactivation": "[E, E] tokens on which both experts are chosen (diagonal: |X_j|)",
    "logit_similarity": "[E, E] cosine between experts' router-logit columns over all tokens",
    "mean_output": "[E, H] mean of f_j(x) over ALL tokens (HC-SMoE); runs every expert on every token",
    "hidden_sample": "[n, H] a seeded, bounded uniform sample of the layer's input hidden states",
    "topk_error": "[K] for k = 1..K (the layer's top-k): Σ_x ‖R_K(x) − R_k(x)‖² / Σ_x ‖R_K(x)‖², R_k the routed "
                  "output when the router picks k experts with the family's own weighting (renormalisation, "
                  "softmax over the k...); what the `topk` step allocates k by",
    "topk_mass": "[K] for k = 1..K: Σ_x of the router probabilities of the k best choices / Σ_x of the K best's "
                 "(gate mass kept at k)",
    "routing_weights": "[N, K] every calibration token's chosen weights (the family's final top-k weights), in "
                       "decreasing order; what a routing policy's global parameter is set from",
    "quant_error_g128_fit": "[E, 4] Σ over X_j of ‖g_j(x)(f_j(x) − f̂_j(x))‖², the squared error expert j's "
                            "rounding adds to the block's output, f̂_j rounded to nearest at 2, 3, 4, 8 bits in "
                            "groups of 128 halved to fit the widths (quant_error_g<G>: groups of G, 0 per channel; "
                            "for mixed precision, MC-MoE)",
}
QUANT_BITS = (2, 3, 4, 8)
QUANT_ERROR = "quant_error_g"


def quant_error_name(group_size: int | None, *, fit: bool = False) -> str:
    """The statistic of expert quantization errors with groups of ``group_size`` (``fit``:
    halved until it divides the experts' widths, `fitted_group_size`)."""
    return f"{QUANT_ERROR}{group_size or 0}{'_fit' if fit else ''}"


def _quant_error_group(name: str, widths: tuple[int, int]) -> int | None:
    from moekit.methods.quantize.scheme import fitted_group_size

    size, _, fit = name.removeprefix(QUANT_ERROR).partition("_")
    group = int(size) or None
    return fitted_group_size(group, widths) if fit else group


def known_statistic(name: str) -> bool:
    size, _, fit = name.removeprefix(QUANT_ERROR).partition("_")
    return name in STATISTICS or (name.startswith(QUANT_ERROR) and size.isdigit() and fit in ("", "fit"))
_ROUTED_OUTPUTS = {"reap", "ean", "man", "msan", "peak"}
_MAXIMA = {"peak"}  # combined across ranks by max, not sum


@dataclass
class BatchContext:
    """One batch of one layer: hidden [T, H] and, computed on first use, its routing and
    the routed experts' outputs."""

    layer: MoELayer
    hidden: torch.Tensor

    @cached_property
    def logits(self) -> torch.Tensor:
        return self.layer.router.logits(self.hidden).float()  # [T, E]

    @cached_property
    def routing(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.router.route(self.logits)  # [T, k], [T, k]

    @cached_property
    def probabilities(self) -> torch.Tensor:
        return self.layer.router.probabilities(self.logits)  # [T, E]

    @cached_property
    def routed(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Per chosen expert j: (j, g_j(x) [n], f_j(x) [n, H]) over the tokens routed to j."""
        index, weights = self.routing
        out = []
        for expert in index.unique().tolist():
            token, slot = torch.where(index == expert)
            f = self.layer.experts.expert_forward(expert, self.hidden[token]).float()
            out.append((expert, weights[token, slot].float(), f))
        return out


@dataclass
class LayerAccumulator:
    """Running sums for one layer; `finish` turns them into the statistics."""

    num_experts: int
    hidden_size: int
    wanted: frozenset[str]
    sample_size: int = 0
    seed: int = 0
    tokens: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    _sample: torch.Tensor | None = None
    _sample_keys: torch.Tensor | None = None
    _chosen: list[torch.Tensor] = field(default_factory=list)  # routing_weights, per batch
    first_position: int = 0  # global position of the first token seen (a rank's share starts later)
    world: Any = None  # a `moekit.distributed.World`: `finish` first combines every rank's sums

    def _add(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()

    def update(self, ctx: BatchContext) -> None:
        E, wanted = self.num_experts, self.wanted
        index, _ = ctx.routing
        self.tokens += ctx.hidden.shape[0]
        counts = torch.bincount(index.flatten(), minlength=E).double()
        self._add("frequency", counts)
        if "soft_frequency" in wanted:
            self._add("soft_frequency", ctx.probabilities.double().sum(0))
        if "coactivation" in wanted:
            chosen = torch.zeros(ctx.hidden.shape[0], E, dtype=torch.float64).scatter_(1, index, 1.0)
            self._add("coactivation", chosen.T @ chosen)
        if "logit_similarity" in wanted:
            logits = ctx.logits.double()
            self._add("logit_gram", logits.T @ logits)
        if wanted & _ROUTED_OUTPUTS:
            self._update_routed(ctx)
        if "mean_output" in wanted:
            outputs = torch.stack(
                [ctx.layer.experts.expert_forward(j, ctx.hidden).double().sum(0) for j in range(E)]
            )
            self._add("output_sum", outputs)
        if "hidden_sample" in wanted and self.sample_size > 0:
            self._update_sample(ctx.hidden)
        for name in (n for n in wanted if n.startswith(QUANT_ERROR)):
            self._update_quant_error(ctx, name)
        if "topk_error" in wanted or "topk_mass" in wanted:
            self._update_topk(ctx)
        if "routing_weights" in wanted:
            self._chosen.append(ctx.routing[1].float().sort(dim=-1, descending=True).values)

    def _update_topk(self, ctx: BatchContext) -> None:
        """Per k below the layer's top-k K: the routed output lost and the gate mass kept
        when the same router picks only k experts (its own semantics, `route` with k)."""
        import dataclasses

        from moekit.arch.routing import route

        layer, spec = ctx.layer, ctx.layer.router.spec
        K = spec.top_k
        index, weights = ctx.routing
        if "topk_mass" in self.wanted:
            chosen = ctx.probabilities.double().gather(1, index)  # slots in choice order
            self._add("topk_mass", chosen.sum(0).cumsum(0))
        if "topk_error" in self.wanted:
            full = layer.routed_forward(ctx.hidden, index, weights).double()
            errors = torch.zeros(K, dtype=torch.float64)
            for k in range(1, K):
                idx, w = route(ctx.logits, dataclasses.replace(spec, top_k=k), layer.router.correction_bias)
                errors[k - 1] = ((layer.routed_forward(ctx.hidden, idx, w).double() - full) ** 2).sum()
            self._add("topk_error", errors)
            self._add("topk_energy", (full**2).sum().reshape(1))

    def _update_quant_error(self, ctx: BatchContext, name: str) -> None:
        """Per routed expert and width: the squared error its rounding adds to the block's
        output on this batch (each expert re-quantized per batch: holding 4 quantized
        copies of a layer's experts would cost 4 layers of memory)."""
        from moekit.methods.quantize.rtn import quantize_rtn
        from moekit.methods.quantize.scheme import QuantScheme

        experts = ctx.layer.experts
        group = _quant_error_group(name, (experts.hidden_size, experts.intermediate_size))
        index, weights = ctx.routing
        errors = torch.zeros(self.num_experts, len(QUANT_BITS), dtype=torch.float64)
        on_input = ctx.layer.router.spec.weight_on_input
        for expert, weight, f in ctx.routed:
            token, _ = torch.where(index == expert)
            x = ctx.hidden[token] * weight[:, None].to(ctx.hidden.dtype) if on_input else ctx.hidden[token]
            scale = torch.ones_like(weight) if on_input else weight
            exact = (f * scale[:, None]).double()
            for column, bits in enumerate(QUANT_BITS):
                scheme = QuantScheme(bits, group)
                gate_up = quantize_rtn(experts.gate_up[expert], scheme).dequantized
                down = quantize_rtn(experts.down[expert], scheme).dequantized
                approx = experts.forward_with(expert, x, gate_up.to(x.dtype), down.to(x.dtype)).double()
                errors[expert, column] = ((approx * scale[:, None].double() - exact) ** 2).sum()
        self._add(name, errors)

    def _update_routed(self, ctx: BatchContext) -> None:
        E = self.num_experts
        reap, ean, msan = (torch.zeros(E, dtype=torch.float64) for _ in range(3))
        peak = torch.zeros(E, dtype=torch.float64)
        for expert, weight, f in ctx.routed:
            norms = f.double().norm(dim=-1)
            reap[expert] = (weight.double() * norms).sum()
            ean[expert] = norms.sum()
            msan[expert] = (norms**2).sum()
            peak[expert] = f.abs().max().double()
        self._add("reap_sum", reap)
        self._add("ean", ean)
        self._add("msan_sum", msan)
        self.sums["peak"] = torch.maximum(self.sums["peak"], peak) if "peak" in self.sums else peak

    def _update_sample(self, hidden: torch.Tensor) -> None:
        """Keep the states with the smallest keys, a key being a hash of (seed, global
        token position): a uniform sample without replacement, independent of batching."""
        n = hidden.shape[0]
        end = self.first_position + self.tokens
        keys = _position_hash(torch.arange(end - n, end), self.seed)
        pool = hidden.float() if self._sample is None else torch.cat([self._sample, hidden.float()])
        pool_keys = keys if self._sample_keys is None else torch.cat([self._sample_keys, keys])
        best = pool_keys.argsort()[: self.sample_size]
        self._sample, self._sample_keys = pool[best], pool_keys[best]

    def reduce(self, world: World) -> None:
        """Replace this layer's running sums, token count, hidden sample and chosen weights by
        those of all ranks together (every rank gets the same). A collective: every rank calls
        it for the same layer in the same order.

        Each rank pushed the same whole batches one process would (`moekit.distributed.shard`),
        so every per-token value is the one a single process computes, bit for bit; only the
        order in which float64 sums are added differs (per rank, then across ranks). The
        statistics therefore equal the single-process ones to float64 rounding (relative 1e-12
        before they are stored as float32, where they almost always come out identical),
        counts exactly, maxima and the hidden sample bit for bit."""
        from moekit.distributed.collectives import all_max, all_sum_many, gather_rows

        sums = {n: t for n, t in self.sums.items() if n not in _MAXIMA}
        tokens = torch.tensor([self.tokens], dtype=torch.int64)
        reduced = all_sum_many({**sums, "_tokens": tokens}, world, f"combining layer statistics ({len(sums)} sums)")
        self.tokens = int(reduced.pop("_tokens").item())
        self.sums.update(reduced)
        for name in _MAXIMA & self.sums.keys():
            self.sums[name] = all_max(self.sums[name], world, "combining expert peaks")
        if self.sample_size > 0 and "hidden_sample" in self.wanted:  # the same test on every rank
            self._combine_sample(world)
        if "routing_weights" in self.wanted:
            local = torch.cat(self._chosen) if self._chosen else torch.zeros(0, 1)
            self._chosen = [gather_rows(local.cpu(), world, "gathering routing weights")]

    def _combine_sample(self, world: World) -> None:
        """The hidden sample keeps the states with the smallest keys (a hash of the seed and
        the global token position); the union of each rank's smallest holds the global
        smallest, and sorting it by key gives exactly the single process's sample, in its
        order. Only keys travel to every rank (8 bytes a state); each state itself is sent
        only when it is among the chosen, so a layer exchanges about one sample of states
        whatever the number of ranks (not one per rank)."""
        from moekit.distributed.collectives import gather_rows

        sample = self._sample if self._sample is not None else torch.zeros(0, self.hidden_size)
        keys = self._sample_keys if self._sample_keys is not None else torch.zeros(0, dtype=torch.int64)
        every_key = gather_rows(keys.cpu(), world, "gathering the hidden sample's keys")
        cut = every_key.sort().values[: self.sample_size]
        chosen = torch.isin(keys.cpu(), cut)  # this rank's states that are in the global sample
        pool = gather_rows(sample.cpu()[chosen], world, "gathering the hidden sample")
        pool_keys = gather_rows(keys.cpu()[chosen], world, "gathering the hidden sample")
        order = pool_keys.argsort()
        device = sample.device
        self._sample, self._sample_keys = pool[order].to(device), pool_keys[order].to(device)

    def finish(self) -> dict[str, torch.Tensor]:
        """The statistics as float32 tensors; experts never routed get zeros, not NaN. In a
        torch.distributed run this is a collective: the ranks' sums are combined first."""
        if self.world is not None:
            self.reduce(self.world)
            self.world = None  # combined once
        counts = self.sums.get("frequency", torch.zeros(self.num_experts, dtype=torch.float64))
        safe = counts.clamp(min=1)
        out: dict[str, torch.Tensor] = {"frequency": counts}
        s = self.sums
        if "soft_frequency" in self.wanted:
            out["soft_frequency"] = s["soft_frequency"]
        if "coactivation" in self.wanted:
            out["coactivation"] = s["coactivation"]
        if "logit_similarity" in self.wanted:
            norms = s["logit_gram"].diagonal().sqrt()
            denom = torch.outer(norms, norms)
            out["logit_similarity"] = torch.where(denom > 0, s["logit_gram"] / denom.clamp(min=1e-300), 0.0)
        if self.wanted & _ROUTED_OUTPUTS:
            routed = {
                "reap": s["reap_sum"] / safe,
                "ean": s["ean"],
                "man": s["ean"] / safe,
                "msan": s["msan_sum"] / safe,
                "peak": s["peak"],
            }
            out.update({k: v for k, v in routed.items() if k in self.wanted})
        if "mean_output" in self.wanted:
            out["mean_output"] = s["output_sum"] / max(self.tokens, 1)
        if "hidden_sample" in self.wanted and self._sample is not None:
            out["hidden_sample"] = self._sample
        for name in (n for n in self.wanted if n.startswith(QUANT_ERROR)):
            out[name] = s.get(name, torch.zeros(self.num_experts, len(QUANT_BITS), dtype=torch.float64))
        if "topk_mass" in self.wanted and "topk_mass" in s:
            out["topk_mass"] = s["topk_mass"] / s["topk_mass"][-1].clamp(min=1e-300)
        if "topk_error" in self.wanted and "topk_error" in s:
            out["topk_error"] = s["topk_error"] / s["topk_energy"].clamp(min=1e-300)
        if "routing_weights" in self.wanted and self._chosen:
            out["routing_weights"] = torch.cat(self._chosen)
        return {k: v.float() for k, v in out.items()}


def _position_hash(positions: torch.Tensor, seed: int) -> torch.Tensor:
    """A splitmix64-style integer hash of token positions (int64 arithmetic wraps)."""
    offset = ((seed + 1) * 0x632BE59BD9B4E019 + 2**63) % 2**64 - 2**63  # as a signed int64
    x = positions.to(torch.int64) + offset
    x = (x ^ (x >> 30)) * -0x40A7B892E31B1A47
    x = (x ^ (x >> 27)) * -0x6B2FB644ECCEEE15
    return x ^ (x >> 31)
