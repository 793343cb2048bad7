"""Model architecture for training: a small family-neutral spec -> a Hugging Face config.

`ModelSpec` names the sizes every MoE shares (hidden size, layers, experts, top-k, ...);
`FAMILIES` says, per supported family, which HF config keys hold them. Anything a
family has beyond those (DeepSeek's MLA ranks, Qwen's ``mlp_only_layers``) goes in
``extra`` verbatim. A plain HF ``config.json`` (anything with ``model_type``) is accepted
too. Both are checked before a model is built, so a bad config fails in a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from moekit.errors import MoekitError, read_json, read_yaml, validation_problems

FamilyName = Literal["qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe", "qwen3"]

# Dense families moekit trains too (the starting points of upcycling and splitting):
# every layer has one MLP of ``intermediate_size``; no router, no router losses.
DENSE_FAMILIES = {"qwen3"}

# DeepSeek-V3's layout of the routed layer, shared by the families that use it.
_SIGMOID_ROUTED = ("n_routed_experts", "moe_intermediate_size",
                   {"first_k_dense_replace": 0, "n_shared_experts": 1, "n_group": 1, "topk_group": 1})

# Per family: (config key of E, config key of the expert intermediate size, fixed extras).
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "qwen3_moe": ("num_experts", "moe_intermediate_size", {"mlp_only_layers": [], "decoder_sparse_step": 1}),
    "mixtral": ("num_local_experts", "intermediate_size", {}),
    "olmoe": ("num_experts", "intermediate_size", {}),
    "deepseek_v3": _SIGMOID_ROUTED,
    # GLM-4.5: DeepSeek-V3's routed layer (sigmoid router, selection bias, shared expert)
    # with grouped-query attention; what `moekit upcycle --family glm4_moe` writes.
    "glm4_moe": _SIGMOID_ROUTED,
}
# Families whose routers carry a selection-only correction bias (aux-loss-free balancing).
BIASED_FAMILIES = {"deepseek_v3", "glm4_moe"}
_EXPERTS_KEYS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}


class ModelSpec(BaseModel):
    """Sizes of an MoE causal LM, independent of its family.

    ``head_dim`` defaults to ``hidden_size // num_heads``. ``norm_topk_prob`` is applied
    where the family has the switch (Mixtral always renormalises).
    """

    model_config = ConfigDict(extra="forbid")

    family: FamilyName
    vocab_size: int = Field(default=8192, ge=1)
    hidden_size: int = Field(default=256, ge=1)
    num_layers: int = Field(default=4, ge=1)
    num_heads: int = Field(default=4, ge=1)
    num_kv_heads: int = Field(default=2, ge=1)
    head_dim: int | None = Field(default=None, ge=1)
    num_experts: int = Field(default=8, ge=1)
    top_k: int = Field(default=2, ge=1)
    expert_intermediate_size: int = Field(default=512, ge=1)
    intermediate_size: int | None = Field(default=None, ge=1, description="a dense family's MLP width")
    norm_topk_prob: bool = True
    max_position_embeddings: int = Field(default=2048, ge=1)
    rope_theta: float = Field(default=10000.0, gt=0)
    tie_word_embeddings: bool = True
    initializer_range: float = Field(default=0.02, gt=0)
    extra: dict[str, Any] = {}

    @model_validator(mode="after")
    def _heads_fit(self) -> ModelSpec:
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}; "
                             "change one or give head_dim")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if (self.family in DENSE_FAMILIES) != (self.intermediate_size is not None):
            raise ValueError("intermediate_size is the MLP width of a dense family (qwen3) and only of one; "
                             "MoE families size their experts with expert_intermediate_size")
        return self

    def hf_config(self) -> PretrainedConfig:
        head_dim = self.head_dim or self.hidden_size // self.num_heads
        if self.family in DENSE_FAMILIES:
            return AutoConfig.for_model(
                self.family, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                num_key_value_heads=self.num_kv_heads, head_dim=head_dim, intermediate_size=self.intermediate_size,
                max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
                initializer_range=self.initializer_range,
                rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                pad_token_id=0, bos_token_id=1, eos_token_id=2, **self.extra)
        experts_key, inter_key, fixed = FAMILIES[self.family]
        values: dict[str, Any] = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            num_experts_per_tok=self.top_k,
            norm_topk_prob=self.norm_topk_prob,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            # A dense MLP size is required by some configs even when every layer is routed.
            intermediate_size=self.expert_intermediate_size,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
            **fixed,
        )
        values[experts_key] = self.num_experts
        values[inter_key] = self.expert_intermediate_size
        if self.family == "deepseek_v3":
            # Multi-head latent attention: ranks sized from the head dim unless given.
            # (HF derives head_dim = qk_rope_head_dim for the rotary part; do not pass ours.)
            values.update(q_lora_rank=None, kv_lora_rank=head_dim * 2, qk_rope_head_dim=head_dim // 2,
                          qk_nope_head_dim=head_dim // 2, v_head_dim=head_dim)
            values.pop("head_dim")
        values.update(self.extra)
        return AutoConfig.for_model(self.family, **values)


def load_model_config(source: str | Path | dict[str, Any] | ModelSpec) -> PretrainedConfig:
    """A checked HF config from a `ModelSpec`, a dict, or a YAML/JSON file of either.

    Raises:
        MoekitError: unknown family, invalid fields, or top-k larger than the expert count.
    """
    if isinstance(source, ModelSpec):
        return check_config(source.hf_config())
    data = _read_mapping(source) if not isinstance(source, dict) else dict(source)
    if "model_type" in data:
        model_type = data.pop("model_type")
        if model_type not in FAMILIES and model_type not in DENSE_FAMILIES:
            raise MoekitError(_unknown(model_type))
        for key in ("architectures", "transformers_version", "dtype", "torch_dtype"):
            data.pop(key, None)
        return check_config(AutoConfig.for_model(model_type, **data))
    if data.get("family") not in FAMILIES and data.get("family") not in DENSE_FAMILIES:
        raise MoekitError(_unknown(data.get("family")))
    try:
        spec = ModelSpec(**data)
    except ValidationError as exc:
        raise MoekitError(f"invalid model config: {validation_problems(exc)}; fix the field and retry.") from None
    return check_config(spec.hf_config())


def check_config(config: PretrainedConfig) -> PretrainedConfig:
    """Refuse configs that would fail (or silently misbehave) only after training began."""
    if config.model_type in DENSE_FAMILIES:
        return config
    if config.model_type not in FAMILIES:
        raise MoekitError(_unknown(config.model_type))
    experts = getattr(config, FAMILIES[config.model_type][0])
    top_k = config.num_experts_per_tok
    if not experts or experts < 1:
        raise MoekitError(f"the config has {experts} experts per layer; an MoE needs at least 1.")
    if top_k < 1 or top_k > experts:
        raise MoekitError(
            f"top-k ({top_k}) must be between 1 and the number of experts ({experts}); "
            "lower num_experts_per_tok / top_k or add experts."
        )
    n_group = getattr(config, "n_group", None) or 1
    if experts % n_group:
        raise MoekitError(f"{experts} experts cannot be split into n_group={n_group} equal groups.")
    # We add router losses ourselves; HF must not add its own on top (see moekit.train.losses).
    config.output_router_logits = False
    return config


def build_model(config: PretrainedConfig, *, seed: int) -> PreTrainedModel:
    """A freshly initialised fp32 causal LM; the same seed gives the same weights."""
    torch.manual_seed(seed)
    # grouped_mm runs all experts of a layer in one kernel: ~20% faster than the
    # per-expert loop on CPU, and numerically the same routing.
    if config.model_type in DENSE_FAMILIES:
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, experts_implementation="grouped_mm")


def _read_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MoekitError(f"model config {str(path)!r} does not exist; pass a YAML/JSON file or a family name.")
    fix = "fix the model config file."
    data = read_json(path, fix=fix) if path.suffix == ".json" else read_yaml(path, fix=fix)
    if not isinstance(data, dict):
        raise MoekitError(f"{path} does not hold a mapping of config fields.")
    return data


def _unknown(name: Any) -> str:
    return f"unknown architecture {name!r}; moekit trains {', '.join([*FAMILIES, *sorted(DENSE_FAMILIES)])}."


def routed_layers(model: PreTrainedModel) -> list:
    """The model's MoE layers (`moekit.moe_layers`); none for a dense family."""
    from moekit.arch.discover import moe_layers

    return [] if model.config.model_type in DENSE_FAMILIES else moe_layers(model)
