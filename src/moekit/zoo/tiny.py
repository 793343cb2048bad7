"""Tiny random models of every supported family, built locally from each family's Config.

They exercise every structural feature moekit must handle (shared experts and their
gates, dense first layers, group-limited routing, correction biases, transposed and
interleaved experts) in a few hundred kilobytes, with no download. Tests use them, and
``moekit.load("moekit/tiny-<family>")`` builds one.

So that every command runs on them with its defaults, they share one small tokenizer
shipped beside this file (`TINY_TOKENIZER_DIR`, written by `make_tiny_tokenizer`) whose
vocabulary is exactly theirs, and have the 256 positions the commands' default sequence
length needs. A byte-level BPE cannot be smaller than 259 tokens (256 bytes and three
specials); 384 leaves room for common merges and costs 8 K parameters per matrix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

TINY_VOCAB = 384
TINY_TOKENIZER_DIR = Path(__file__).resolve().parent / "tiny-tokenizer"

_COMMON: dict[str, Any] = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

# Per family: model_type, then overrides of _COMMON. E=8 experts, k=2 unless noted.
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral": ("mixtral", dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (
        "qwen2_moe",
        dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
             num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0]),
    ),
    "qwen3_moe": (
        "qwen3_moe",
        dict(intermediate_size=48, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=True, head_dim=8, mlp_only_layers=[1]),
    ),
    "qwen3_next": (
        "qwen3_next",
        dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
             num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, head_dim=8,
             layer_types=["linear_attention", "full_attention", "linear_attention"],
             linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
             linear_value_head_dim=8, linear_conv_kernel_dim=2),
    ),
    "olmoe": ("olmoe", dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    "deepseek_v2": (
        "deepseek_v2",
        dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
             n_shared_experts=1, first_k_dense_replace=1, topk_method="group_limited_greedy",
             n_group=2, topk_group=1, routed_scaling_factor=1.5, kv_lora_rank=16, q_lora_rank=None, num_key_value_heads=4,
             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8),
    ),
    "deepseek_v3": (
        "deepseek_v3",
        dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
             n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True,
             routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, num_key_value_heads=4, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=8, head_dim=8),
    ),
    "glm4_moe": (
        "glm4_moe",
        dict(intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
             n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True,
             routed_scaling_factor=1.5, head_dim=8),
    ),
    "gpt_oss": (
        "gpt_oss",
        dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
             sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    ),
    "phimoe": ("phimoe", dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)),
    "granitemoe": ("granitemoe", dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2)),
    "granitemoeshared": (
        "granitemoeshared",
        dict(intermediate_size=24, shared_intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    ),
    "ernie4_5_moe": (
        "ernie4_5_moe",
        dict(intermediate_size=48, moe_intermediate_size=16, moe_num_experts=8, moe_k=2,
             moe_num_shared_experts=1, moe_layer_start_index=1, head_dim=8),
    ),
    "llama4": (
        "llama4_text",
        dict(intermediate_size=16, intermediate_size_mlp=48, num_local_experts=8, num_experts_per_tok=2,
             head_dim=8, moe_layers=[0, 2], interleave_moe_layer_step=2, attention_chunk_size=64,
             no_rope_layers=[1, 1, 1]),
    ),
}


def tiny_config(family: str) -> PretrainedConfig:
    """The tiny Config of ``family`` (a key of `TINY_CONFIGS`)."""
    model_type, overrides = TINY_CONFIGS[family]
    return AutoConfig.for_model(model_type, **{**_COMMON, **overrides})


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every float parameter and buffer with seeded noise, so routing has clear
    winners (HF initialises some routers to zero, which makes every token a tie)."""
    gen = torch.Generator().manual_seed(seed)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_floating_point() or "inv_freq" in name:
            continue
        noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
        if tensor.ndim >= 2:
            noise = noise / tensor.shape[-1] ** 0.5
        elif "norm" in name:
            noise = 1.0 + 0.1 * noise
        else:
            noise = 0.1 * noise
        tensor.copy_(noise.to(tensor.dtype))
    return model


def tiny_model(family: str, seed: int = 0) -> PreTrainedModel:
    """A tiny random causal LM of ``family``, fp32, in eval mode."""
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return randomize_(model, seed).eval()


def make_tiny_tokenizer(directory: Path = TINY_TOKENIZER_DIR) -> Path:
    """Train the tiny models' tokenizer on the shipped ``stdlib:calib`` split and save it
    (done once, by maintainers: ``python scripts/make_tiny_tokenizer.py``). The split is
    fixed text and BPE training is deterministic, so the result is the same everywhere."""
    from moekit.data.shipped import stdlib_corpus
    from moekit.data.tokenizer import save_tokenizer, train_tokenizer

    return save_tokenizer(train_tokenizer(stdlib_corpus("calib").texts(), vocab_size=TINY_VOCAB), directory)
