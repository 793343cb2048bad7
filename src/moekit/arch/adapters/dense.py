"""The dense families moekit builds MoEs from, and the MoE family each can become: data,
so that arch can name the building commands when it refuses a dense model, and build
(upcycle, split, combine) can write the target's config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """An MoE family an upcycled model is written as: its config keys and fixed settings."""

    model_type: str
    experts_key: str
    width_key: str
    extras: dict[str, Any]
    shared_expert: bool = False  # one ungated shared expert beside the routed ones


# dense model_type -> the MoE families it can become; the first is the default
TARGETS: dict[str, dict[str, Target]] = {
    "qwen3": {
        "qwen3_moe": Target("qwen3_moe", "num_experts", "moe_intermediate_size",
                            {"norm_topk_prob": True, "mlp_only_layers": [], "decoder_sparse_step": 1}),
        # renormalised top-k, no scaling, one group: the step-0 sum is exact (module docstring)
        "glm4_moe": Target("glm4_moe", "n_routed_experts", "moe_intermediate_size",
                           {"norm_topk_prob": True, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
                            "first_k_dense_replace": 0, "use_qk_norm": True, "partial_rotary_factor": 1.0},
                           shared_expert=True),
    },
    "mistral": {"mixtral": Target("mixtral", "num_local_experts", "intermediate_size", {})},
    "llama": {"mixtral": Target("mixtral", "num_local_experts", "intermediate_size", {})},
}
