"""Named model specs: one small default per family, and the two reference models.

The reference specs are what `scripts/train_reference.py` trains into ``moekit/zoo``;
their sizes were settled on short runs (see that script's docstring for the numbers).
"""

from __future__ import annotations

from moekit.train.config import BIASED_FAMILIES, FAMILIES, ModelSpec

REFERENCE: dict[str, ModelSpec] = {
    # Fine-grained: many small experts, top-4 (Qwen3-MoE / OLMoE style).
    "ref-fine": ModelSpec(
        family="qwen3_moe", vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=64, num_experts=32, top_k=4, expert_intermediate_size=96, norm_topk_prob=True,
        max_position_embeddings=1024,
    ),
    # Dense (Qwen3): the start of upcycling and splitting; its MLP is as wide as ref-fine's
    # four active experts together, so both spend the same parameters per token.
    "ref-dense": ModelSpec(
        family="qwen3", vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=64, intermediate_size=384, max_position_embeddings=1024,
    ),
    # Coarse: few big experts, top-2 (Mixtral style).
    "ref-coarse": ModelSpec(
        family="mixtral", vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=64, num_experts=8, top_k=2, expert_intermediate_size=384, max_position_embeddings=1024,
    ),
}


def small_spec(family: str) -> ModelSpec:
    """A small model of ``family`` that trains at a few thousand tokens/s on one core."""
    extra = {"n_group": 1, "topk_group": 1} if family in BIASED_FAMILIES else {}
    return ModelSpec(family=family, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     num_experts=8, top_k=2, expert_intermediate_size=128, extra=extra)


def preset(name: str) -> ModelSpec | None:
    """The spec called ``name`` (a reference name or a family name), or None."""
    if name in REFERENCE:
        return REFERENCE[name].model_copy(deep=True)
    if name in FAMILIES:
        return small_spec(name)
    return None
