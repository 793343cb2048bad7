"""gpt-oss: top-k over biased logits, softmax over the chosen k; experts stored transposed
with interleaved gate/up columns, biases, and a clamped SwiGLU."""

from moekit.arch.adapters.base import Family, Routing
from moekit.arch.experts import ExpertsSpec

FAMILY = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    num_experts_key="num_local_experts",
    router="router",
    routing=Routing(scoring="softmax", topk_before_scoring=True),
    block_returns_pair=True,
    eager_skips_sentinel=False,
    experts_spec=ExpertsSpec(transposed=True, layout="interleaved", clamped_swiglu=True),
)
