"""Write a synthetic MoE checkpoint shard by shard, never holding the model.

The streaming benchmark needs checkpoints bigger than this machine's memory, so the
writer can neither build the model nor call ``save_pretrained``. Instead it builds the
model on the meta device (shapes, no storage), asks transformers itself for the names
``save_pretrained`` would write (its reverse weight conversion turns the fused
``experts.gate_up_proj [E, 2I, H]`` into per-expert ``gate_proj``/``up_proj``), shards
them with the same rule, and then materialises one shard at a time: random bf16 weights
(normal, std 0.02, seeded per tensor name; norms ones), written with safetensors, freed.
Peak memory is about one shard. The folder also holds config.json, generation_config.json
and the shipped reference's tokenizer, so every moekit command can run on it offline.

    python benchmarks/synthetic.py /tmp/s24 --preset s24
    python benchmarks/synthetic.py /tmp/tiny --layers 2 --hidden 64 --experts 4 --expert-width 32 --top-k 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import time
from pathlib import Path

import torch
from huggingface_hub.serialization._base import split_state_dict_into_shards_factory
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, MixtralConfig, PretrainedConfig, Qwen3MoeConfig
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

REFERENCE = Path(__file__).resolve().parents[1] / "src" / "moekit" / "zoo" / "ref-fine"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# s24/s48 are Qwen3-30B-A3B's attention and expert shapes (hidden 2048, experts of width
# 768, top-8) with half its 128 experts; big keeps all 128 (its real layer) at 26 layers,
# about 32 GB in bf16, larger than this machine's 24 GiB of RAM.
PRESETS = {
    "s24": dict(layers=24, hidden=2048, experts=64, expert_width=768, top_k=8),
    "s48": dict(layers=48, hidden=2048, experts=64, expert_width=768, top_k=8),
    "big": dict(layers=26, hidden=2048, experts=128, expert_width=768, top_k=8),
}
STD = 0.02


def reference_token_ids() -> dict:
    """vocab_size and special token ids of the shipped tokenizer, so its ids index the embedding."""
    ref = json.loads((REFERENCE / "config.json").read_text())
    return {k: ref[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}


def make_config(family: str, layers: int, hidden: int, experts: int, expert_width: int, top_k: int) -> PretrainedConfig:
    """A real family config; attention is sized like the family's published models at this width."""
    common = dict(num_hidden_layers=layers, hidden_size=hidden, num_experts_per_tok=top_k,
                  tie_word_embeddings=False, **reference_token_ids())
    if family == "qwen3_moe":
        # Qwen3-30B-A3B: hidden 2048, 32 heads of 128, 4 KV heads (head_dim is decoupled from hidden).
        heads = max(4, hidden // 64)
        return Qwen3MoeConfig(num_experts=experts, moe_intermediate_size=expert_width, intermediate_size=8 * expert_width,
                              num_attention_heads=heads, num_key_value_heads=max(1, heads // 8),
                              head_dim=min(128, hidden // 4), norm_topk_prob=True, mlp_only_layers=[], **common)
    if family == "mixtral":
        # Mixtral-8x7B: hidden 4096, 32 heads of 128, 8 KV heads.
        heads = max(4, hidden // 128)
        return MixtralConfig(num_local_experts=experts, intermediate_size=expert_width, num_attention_heads=heads,
                             num_key_value_heads=max(1, heads // 4), **common)
    raise SystemExit(f"unknown family {family!r}: qwen3_moe or mixtral")


def meta_model(config: PretrainedConfig):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def layout(model, max_shard_size: int | str):
    """(tensors as save_pretrained names them, meta, and their split into shards), by transformers' own rules.

    save_pretrained drops tied weights, reverts the weight conversion and then shards; the
    per-expert tensors it reverts are views of one fused tensor, which huggingface_hub keeps in
    one shard and counts once. On meta tensors storage ids are unknown, so the view's base
    stands in for the shared storage; the test checks the result equals a real save_pretrained.
    """
    state = revert_weight_conversion(model, remove_tied_weights_from_state_dict(model.state_dict(), model))
    split = split_state_dict_into_shards_factory(
        state, get_storage_size=lambda t: t.untyped_storage().nbytes(),
        get_storage_id=lambda t: id(t._base if t._base is not None else t),
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)
    return state, split


def intended(name: str, shape, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The value the writer stores under ``name``: a pure function of (seed, name, shape), so tests can recompute it."""
    if len(shape) == 1:
        # 1-D weights are norms (scale 1) in the families written here; anything else 1-D is a bias (0).
        return (torch.ones if "norm" in name else torch.zeros)(shape, dtype=dtype)
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    # Drawn straight in the stored dtype: an fp32 draw and a cast left fp32 holes in the heap
    # that glibc kept, and the writer peaked at 3.9 GiB for 2 GB shards instead of about one shard.
    return torch.empty(shape, dtype=dtype).normal_(0.0, STD, generator=gen)


def write(out: str | Path, config: PretrainedConfig, shard_size: str = "2GB", seed: int = 0) -> dict:
    """Write the checkpoint into ``out`` (which must not exist); returns what was written and what it cost."""
    out = Path(out)
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new folder")
    start = time.perf_counter()
    model = meta_model(config)
    state, split = layout(model, shard_size)
    # Written under a temporary name and renamed at the end: a killed writer leaves no folder that looks complete.
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for filename, names in split.filename_to_tensors.items():
        shard = {n: intended(n, state[n].shape, state[n].dtype, seed) for n in names}
        save_file(shard, work / filename, metadata={"format": "pt"})
        del shard
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        (work / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    # What save_pretrained does to the config before saving it.
    model.config.dtype = "bfloat16"
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(work)
    if model.can_generate():
        model.generation_config.save_pretrained(work)
    for name in TOKENIZER_FILES:
        if (REFERENCE / name).exists():
            shutil.copy(REFERENCE / name, work / name)
    os.replace(work, out)
    seconds = time.perf_counter() - start
    total = split.metadata["total_size"]
    return {"out": str(out), "model_type": config.model_type, "parameters": model.num_parameters(),
            "bytes": total, "shards": len(split.filename_to_tensors), "seconds": round(seconds, 1),
            "mb_per_s": round(total / 1e6 / seconds, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="new folder (e.g. under /tmp; never commit it)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named size; explicit options override it")
    p.add_argument("--family", default="qwen3_moe", choices=["qwen3_moe", "mixtral"])
    for flag in ("layers", "hidden", "experts", "expert-width", "top-k"):
        p.add_argument(f"--{flag}", type=int)
    p.add_argument("--shard-size", default="2GB", help="max shard size, as save_pretrained's max_shard_size")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    sizes = dict(PRESETS.get(args.preset, PRESETS["s24"]))
    sizes.update({k: v for k in sizes if (v := getattr(args, k)) is not None})
    config = make_config(args.family, **sizes)
    torch.set_num_threads(1)  # normal_ is faster on one thread than two contending ones (measured on 2 cores)
    result = {**sizes, **write(args.out, config, args.shard_size, args.seed)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
