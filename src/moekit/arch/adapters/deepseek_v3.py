"""DeepSeek-V3 (and Kimi-K2-style checkpoints): sigmoid scoring, selection-only correction
bias, group-limited routing ranked by each group's two best, renormalised and scaled."""

from moekit.arch.adapters.base import Cfg, Family, Routing, Shared

FAMILY = Family(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    num_experts_key="n_routed_experts",
    routing=Routing(
        scoring="sigmoid",
        norm_topk_prob=Cfg("norm_topk_prob", False),
        routed_scaling_factor=Cfg("routed_scaling_factor", 1.0),
        n_group=Cfg("n_group", 1),
        topk_group=Cfg("topk_group", 1),
        group_score="top2_sum",
    ),
    correction_bias="e_score_correction_bias",
    shared=Shared(mlp="mlp.shared_experts"),
)
