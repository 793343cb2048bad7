"""What `moekit inspect` reports: layer by layer structure, parameter and byte counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from moekit.arch.discover import DecoderLayerInfo, decoder_layers, family_of
from moekit.arch.layout import POLICY_KEY, dropped_mlp_layers
from moekit.arch.storage import saved_tensors, storage_dtypes
from moekit.errors import UnsupportedModelError


@dataclass
class LayerSummary:
    index: int
    kind: str  # "moe" | "dense" | "no MLP" (its MoE sublayer dropped)
    num_experts: int = 0
    top_k: int = 0
    expert_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    scoring: str = ""
    routed_params: int = 0
    factored: dict | None = None  # experts stored as low-rank factors: mean ranks, shared base (`decompose`)


@dataclass
class ModelSummary:
    """Counts over unique parameters (tied embeddings once).

    ``active_params``: parameters one token uses: everything but the routed experts,
    plus top_k / E of each layer's routed experts (of factored experts: their shared bases,
    plus top_k / E of their factors).
    """

    model_class: str
    family: str
    layers: list[LayerSummary]
    total_params: int
    routed_params: int
    active_params: int
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)

    @property
    def routed_share(self) -> float:
        return self.routed_params / self.total_params if self.total_params else 0.0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_dtype.values())

    def to_dict(self) -> dict:
        return {**asdict(self), "routed_share": self.routed_share, "total_bytes": self.total_bytes}


def summarize(model: nn.Module, *, stored_dtype: torch.dtype | None = None) -> ModelSummary:
    """Structure and size of an MoE model, or of a dense decoder (every layer dense, its
    family its model_type: what `moekit upcycle` and `moekit split` start from); see
    `ModelSummary`.

    Bytes are those of everything a checkpoint holds (parameters and persistent buffers);
    ``stored_dtype``: count them at the size a checkpoint of this dtype stores them in
    (`storage_dtypes`) rather than at the dtype they are computed in.

    Raises:
        UnsupportedModelError: neither a supported MoE nor a dense decoder (an MoE of a
            family moekit does not know is not counted as dense).
    """
    try:
        family, views = family_of(model).name, decoder_layers(model)
    except UnsupportedModelError:
        dense = _dense_decoder_layers(model)
        if dense is None:
            raise
        family, views = model.config.model_type, [DecoderLayerInfo(index=i, moe=None) for i in range(len(dense))]
    params = list(model.parameters())  # unique tensors: tied weights count once
    total = sum(p.numel() for p in params)
    plan = storage_dtypes(model, stored_dtype) if stored_dtype is not None else {}
    bytes_by_dtype: Counter[str] = Counter()
    for name, t in saved_tensors(model):
        dtype = plan.get(name, t.dtype)
        bytes_by_dtype[str(dtype).removeprefix("torch.")] += t.numel() * dtype.itemsize

    layers, routed, active_routed = [], 0, 0.0
    for info in views:
        moe = info.moe
        if moe is None:  # a dense MLP, or none at all (`moekit.arch.edit.drop_mlp`)
            dropped = info.index in dropped_mlp_layers(model.config)
            layers.append(LayerSummary(index=info.index, kind="no MLP" if dropped else "dense"))
            continue
        layer_routed = sum(p.numel() for p in moe.experts.module.parameters())
        routed += layer_routed
        active = getattr(moe.experts.module, "active_params", None)  # factored experts: bases always active
        active_routed += active(moe.top_k) if active is not None else layer_routed * moe.top_k / moe.num_experts
        layers.append(
            LayerSummary(
                index=info.index,
                kind="moe",
                num_experts=moe.num_experts,
                top_k=moe.top_k,
                expert_intermediate_size=moe.experts.intermediate_size,
                shared_intermediate_size=moe.shared.intermediate_size if moe.shared else 0,
                scoring=moe.router.spec.scoring,
                routed_params=layer_routed,
                factored=_factored(moe.experts.module),
            )
        )
    return ModelSummary(
        model_class=type(model).__name__,
        family=family,
        layers=layers,
        total_params=total,
        routed_params=routed,
        active_params=total - routed + round(active_routed),
        bytes_by_dtype=dict(bytes_by_dtype),
    )


def _dense_decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layers of a dense causal LM in transformers' usual layout (``model.layers``,
    each with an ``mlp``), or None: another layout, or experts of a family moekit does not view."""
    stack = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(stack, nn.ModuleList) or not all(hasattr(layer, "mlp") for layer in stack):
        return None
    if any("expert" in name for name, _ in model.named_modules()):
        return None
    return stack


def _factored(module: nn.Module) -> dict | None:
    ranks = module.ranks() if getattr(module, "moekit_factored", False) else None
    if ranks is None:
        return None
    return {"mean_rank_gate_up": round(sum(ranks["gate_up"]) / len(ranks["gate_up"]), 2),
            "mean_rank_down": round(sum(ranks["down"]) / len(ranks["down"]), 2), "shared_base": ranks["base"]}


# -- sizes as reports give them (compress, plan) ------------------------------------------
def summary(model: nn.Module, stored: torch.dtype, checkpoint=None) -> dict:
    """Sizes for reports: parameters (total, active per token, routed), bytes as stored in
    ``stored`` (or, given the `Checkpoint` the model was read from, as that checkpoint
    stores them: a quantized input's packed bytes, not its dequantized floats), experts
    per MoE layer."""
    s = summarize(model, stored_dtype=stored)
    moe = [l for l in s.layers if l.kind == "moe"]
    return {"total_params": s.total_params, "active_params": s.active_params, "routed_params": s.routed_params,
            "bytes": checkpoint.stored_bytes if checkpoint is not None else s.total_bytes,
            "experts_per_layer": {str(l.index): l.num_experts for l in moe},
            "experts_per_token": sum(l.top_k for l in moe) / len(moe) if moe else 0.0}  # mean top-k over MoE layers


def with_routing_policy(sizes: dict, model: nn.Module, steps: list[dict]) -> dict:
    """``sizes`` (`summary`) of a model whose last ``routing_policy`` step (its report in
    ``steps``) computes fewer experts per token than top-k: ``experts_per_token`` becomes the
    mean the policy kept on the calibration tokens, ``active_params_with_policy`` the mean
    parameters per token that follow (``active_params`` stays at the full top-k), both None
    when the policy's parameter was given rather than calibrated (nothing was measured)."""
    policy = getattr(model.config, POLICY_KEY, None)
    step = next((s for s in reversed(steps) if s["type"] == "routing_policy"), None)
    if step is None or not policy:
        return sizes
    measured = {int(i): v for i, v in (step.get("experts_per_token") or {}).items()}
    sizes = {**sizes, "routing_policy": policy["kind"], "experts_per_token": None, "active_params_with_policy": None}
    layers = [l for l in summarize(model).layers if l.kind == "moe"]
    if measured and all(l.index in measured for l in layers):
        sizes["experts_per_token"] = round(sum(measured[l.index] for l in layers) / len(layers), 4)
        saved = sum(l.routed_params * (l.top_k - measured[l.index]) / l.num_experts for l in layers)
        sizes["active_params_with_policy"] = round(sizes["active_params"] - saved)
    return sizes
