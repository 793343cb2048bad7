"""Llama-4 (text): top-k over logits, sigmoid of the chosen logits scales each expert's
*input*; experts stored transposed; one shared expert."""

from moekit.arch.adapters.base import Family, Routing, Shared
from moekit.arch.experts import ExpertsSpec

FAMILY = Family(
    name="llama4",
    model_types=("llama4_text", "llama4"),
    num_experts_key="num_local_experts",
    layers="model.layers",
    block="feed_forward",
    router="router",
    routing=Routing(scoring="sigmoid", topk_before_scoring=True, weight_on_input=True),
    block_returns_pair=True,
    experts_spec=ExpertsSpec(transposed=True),
    shared=Shared(mlp="feed_forward.shared_expert"),
)
