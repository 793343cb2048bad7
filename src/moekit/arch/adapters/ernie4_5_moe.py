"""ERNIE-4.5 MoE: softmax router, selection-only correction bias, renormalisation with a
floor (``moe_norm_min``), optional shared experts."""

from moekit.arch.adapters.base import Cfg, Family, Routing, Shared

FAMILY = Family(
    name="ernie4_5_moe",
    model_types=("ernie4_5_moe",),
    num_experts_key="moe_num_experts",
    top_k_key="moe_k",
    routing=Routing(scoring="softmax", norm_topk_prob=True, norm_min=Cfg("moe_norm_min", 1e-12)),
    correction_bias="moe_statics.e_score_correction_bias",
    shared=Shared(mlp="mlp.shared_experts"),
)
