"""Qwen3-MoE: fine-grained experts, softmax router, no shared expert."""

from moekit.arch.adapters.base import Cfg, Family, Routing

FAMILY = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    num_experts_key="num_experts",
    routing=Routing(scoring="softmax", norm_topk_prob=Cfg("norm_topk_prob", False)),
)
