"""Mixtral (Jiang et al. 2024): softmax router, top-k renormalised."""

from moekit.arch.adapters.base import Family, Routing

FAMILY = Family(
    name="mixtral",
    model_types=("mixtral",),
    num_experts_key="num_local_experts",
    routing=Routing(scoring="softmax", norm_topk_prob=True),
)
