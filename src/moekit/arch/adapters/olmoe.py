"""OLMoE (Muennighoff et al. 2024): 64 fine-grained experts, softmax router."""

from moekit.arch.adapters.base import Cfg, Family, Routing

FAMILY = Family(
    name="olmoe",
    model_types=("olmoe",),
    num_experts_key="num_experts",
    routing=Routing(scoring="softmax", norm_topk_prob=Cfg("norm_topk_prob", False)),
)
