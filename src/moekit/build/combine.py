"""Combining several dense models into one MoE (Branch-Train-MiX, Sukhbaatar et al. 2024,
arXiv 2403.07816; mergekit-moe): each model's MLP becomes one expert of every layer, and
the rest (attention, norms, embeddings, head) is averaged over the models (BTX) or taken
from the first.

Routers: ``hidden`` sets expert e's row to the mean direction of the hidden states that
enter that layer's MLP when model e reads its own data (mergekit's "hidden" gate, with each
model's own hidden states), so a token like model e's domain leans towards expert e;
``random`` starts small and random. The families written renormalise the top-k weights,
so when the models are identical the MoE computes their logits whatever the router.

The models must share the architecture (every size in the config) and the tokenizer;
anything else is refused, naming the difference, before a weight is read.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

import torch

from moekit.errors import MoekitError

_SIZES = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def check_combinable(configs: list, tokenizers: list[Path | None], names: list[str]) -> None:
    """Refuse models that cannot be experts of one MoE, naming the first difference."""
    if len(configs) < 2:
        raise MoekitError("combine needs at least two dense models.")
    first = configs[0]
    for config, name in zip(configs[1:], names[1:]):
        for key in _SIZES:
            if getattr(config, key, None) != getattr(first, key, None):
                raise MoekitError(f"{name} has {key} {getattr(config, key, None)!r} but {names[0]} has "
                                  f"{getattr(first, key, None)!r}; combined models share one architecture.")
    digests = [_tokenizer_digest(t) for t in tokenizers]
    for digest, name in zip(digests[1:], names[1:]):
        if digest != digests[0]:
            raise MoekitError(f"{name}'s tokenizer differs from {names[0]}'s; combined models read one token stream, "
                              "so they must share their tokenizer.")


def _tokenizer_digest(folder: Path | None) -> str | None:
    file = folder / "tokenizer.json" if folder is not None else None
    return hashlib.sha256(file.read_bytes()).hexdigest() if file is not None and file.is_file() else None


def hidden_router_row(states: torch.Tensor) -> torch.Tensor:
    """The unit mean direction [H] of a model's MLP inputs [N, H] (each state normalised first,
    so a few large states do not decide it)."""
    mean = torch.nn.functional.normalize(states.float(), dim=-1).mean(0)
    return mean / mean.norm().clamp(min=1e-12)


def combine(denses: list[str | os.PathLike], *, out_dir: str | os.PathLike, top_k: int = 2,
            shared: Literal["average", "first"] = "average", router: Literal["hidden", "random"] = "hidden",
            data: list[str] | None = None, n_samples: int = 8, seq_len: int = 256, seed: int = 0,
            scale: float = 1.0) -> dict:
    """Write the MoE combining the dense checkpoints ``denses`` (expert e is model e's MLP)
    into the new folder ``out_dir``, one decoder layer at a time. ``data``: one corpus per
    model for the ``hidden`` router (default: the shipped calibration split for all);
    ``scale`` multiplies the unit router rows. Returns the report.

    Raises:
        MoekitError: before any weight is read, for fewer than two models, models of
            different architectures or tokenizers, a family moekit does not build from, a
            top-k outside 1..models, or a data list of another length.
    """
    from transformers import AutoConfig

    from moekit.build.upcycle import TARGETS, moe_config
    from moekit.build.writer import DenseSource, MlpInputs, dense_mlp, refuse_built_from_quantized, write_moe
    from moekit.data.tokens import calibration_tokens
    from moekit.io.tokenizer import tokenizer_for
    from moekit.io.checkpoint import Checkpoint
    from moekit.io.load import check_model

    source = DenseSource.open(denses[0], out_dir)
    folders = [source.folder] + [check_model(str(d)) for d in denses[1:]]
    if any(f is None for f in folders):
        raise MoekitError("combine reads dense checkpoint folders; give each model's folder.")
    for dense, folder in zip(denses[1:], folders[1:]):
        refuse_built_from_quantized(str(dense), folder)
    configs = [AutoConfig.from_pretrained(f) for f in folders]
    check_combinable(configs, folders, [str(d) for d in denses])
    if source.config.model_type not in TARGETS:
        raise MoekitError(f"cannot combine {source.config.model_type!r} models; moekit builds MoEs from dense "
                          f"{', '.join(sorted(TARGETS))} models.")
    experts = len(folders)
    if not 1 <= top_k <= experts:
        raise MoekitError(f"--top-k {top_k} must be between 1 and the number of models ({experts}).")
    data = data or ["stdlib:calib"] * experts
    if len(data) != experts:
        raise MoekitError(f"give one corpus per model: {experts} models, {len(data)} corpora.")
    checkpoints = [Checkpoint(f) for f in folders]
    streams = None
    if router == "hidden":  # each model reads its own data
        streams = [MlpInputs(folder, calibration_tokens(corpus, tokenizer_for(str(folder)), n_samples=n_samples,
                                                         seq_len=seq_len, seed=seed).input_ids)
                   for folder, corpus in zip(folders, data)]
    generator = torch.Generator().manual_seed(seed)

    def experts_of(index: int, first_mlp):
        mlps = [first_mlp] + [dense_mlp(c.read(c.names(f"{_prefix(c)}{index}.mlp.")), f"{_prefix(c)}{index}.")
                              for c in checkpoints[1:]]
        gate_up = torch.stack([torch.cat([gate, up]) for gate, up, _ in mlps])
        down = torch.stack([d for _, _, d in mlps])
        if streams is None:
            rows = torch.randn(experts, gate_up.shape[2], generator=generator) * 0.02
        else:
            rows = torch.stack([hidden_router_row(stream.at(index)) for stream in streams]) * scale
        return gate_up, down, rows, {}

    def average(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if shared == "first":
            return state
        others = [c.read(list(state)) for c in checkpoints[1:]]
        return {name: sum([tensor.float(), *(o[name].float() for o in others)]) / experts
                for name, tensor in state.items()}

    report = {"models": [str(f) for f in folders], "experts": experts, "top_k": top_k, "shared": shared,
              "router": router, **({"data": data} if router == "hidden" else {}), "seed": seed}
    width = source.config.intermediate_size
    return write_moe(source, moe_config(source.config, experts=experts, top_k=top_k, width=width), experts_of,
                     report=report, name="combine.json", shared=average)


def _prefix(checkpoint) -> str:
    """``model.layers.`` (where the checkpoint's decoder layers are named)."""
    name = next(n for n in checkpoint.names() if ".layers.0." in n)
    return name[: name.index(".layers.0.") + len(".layers.")]
