"""Qwen1.5/Qwen2-MoE: softmax router, one shared expert behind a sigmoid gate."""

from moekit.arch.adapters.base import Cfg, Family, Routing, Shared

FAMILY = Family(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    num_experts_key="num_experts",
    routing=Routing(scoring="softmax", norm_topk_prob=Cfg("norm_topk_prob", False)),
    shared=Shared(mlp="mlp.shared_expert", gate="mlp.shared_expert_gate"),
)
