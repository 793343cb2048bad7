"""Phi-3.5-MoE: sparsemixer routing (top-2, each weight a softmax over near-best logits)."""

from moekit.arch.adapters.base import Cfg, Family, Routing

FAMILY = Family(
    name="phimoe",
    model_types=("phimoe",),
    num_experts_key="num_local_experts",
    router="router",
    routing=Routing(scoring="sparsemixer", jitter_eps=Cfg("router_jitter_noise", 0.01)),
)
