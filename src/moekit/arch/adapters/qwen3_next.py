"""Qwen3-Next: hybrid linear/full attention; MoE with a gated shared expert."""

from moekit.arch.adapters.base import Cfg, Family, Routing, Shared

FAMILY = Family(
    name="qwen3_next",
    model_types=("qwen3_next",),
    num_experts_key="num_experts",
    routing=Routing(scoring="softmax", norm_topk_prob=Cfg("norm_topk_prob", False)),
    shared=Shared(mlp="mlp.shared_expert", gate="mlp.shared_expert_gate"),
)
