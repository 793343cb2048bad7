"""Granite-MoE with a shared MLP that sits beside the MoE block in the decoder layer."""

from moekit.arch.adapters.base import Family, Routing, Shared

FAMILY = Family(
    name="granitemoeshared",
    model_types=("granitemoeshared",),
    num_experts_key="num_local_experts",
    block="block_sparse_moe",
    router="router",
    routing=Routing(scoring="softmax", topk_before_scoring=True),
    shared=Shared(mlp="shared_mlp", fused=True),
)
