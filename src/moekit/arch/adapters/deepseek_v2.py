"""DeepSeek-V2: softmax router, optional group-limited greedy routing (best expert per
group ranks the group), routed scaling, shared experts, first layers dense."""

from moekit.arch.adapters.base import Cfg, Family, Routing, Shared

_GROUPED = ("topk_method", "group_limited_greedy")

FAMILY = Family(
    name="deepseek_v2",
    model_types=("deepseek_v2",),
    num_experts_key="n_routed_experts",
    routing=Routing(
        scoring="softmax",
        routed_scaling_factor=Cfg("routed_scaling_factor", 1.0),
        n_group=Cfg("n_group", 1, only_if=_GROUPED),
        topk_group=Cfg("topk_group", 1, only_if=_GROUPED),
        group_score="max",
    ),
    shared=Shared(mlp="mlp.shared_experts"),
)
