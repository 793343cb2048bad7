"""Granite-MoE: top-k over logits, softmax over the chosen k."""

from moekit.arch.adapters.base import Family, Routing

FAMILY = Family(
    name="granitemoe",
    model_types=("granitemoe",),
    num_experts_key="num_local_experts",
    block="block_sparse_moe",
    router="router",
    routing=Routing(scoring="softmax", topk_before_scoring=True),
)
