"""benchmarks/synthetic.py writes what save_pretrained would, without holding the model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import synthetic  # noqa: E402

TINY = dict(layers=2, hidden=64, experts=4, expert_width=32, top_k=2)
# Small enough that the tiny model spans several shards, so the index and the grouping of
# per-expert tensors into shards are exercised.
SHARD = "300KB"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_plain_transformers_loads_it_and_saves_the_same_layout(tmp_path, family):
    config = synthetic.make_config(family, **TINY)
    result = synthetic.write(tmp_path / "syn", config, shard_size=SHARD, seed=3)
    syn = Path(result["out"])
    assert result["shards"] > 1 and (syn / "model.safetensors.index.json").exists()
    assert not (tmp_path / "syn.partial").exists()

    model, info = AutoModelForCausalLM.from_pretrained(syn, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info  # no missing, unexpected or mismatched keys
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == 8192

    # Every stored tensor is the writer's intended value, bitwise.
    written = _tensors(syn)
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, synthetic.intended(name, tuple(tensor.shape), torch.bfloat16, seed=3)), name
    assert any(".experts.3." in n for n in written)  # per-expert names, as transformers saves them

    # save_pretrained of the loaded model gives the same files: same shards, index, config and values.
    again = tmp_path / "again"
    model.save_pretrained(again, max_shard_size=SHARD)
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        assert json.loads((again / name).read_text()) == json.loads((syn / name).read_text()), name
    resaved = _tensors(again)
    assert resaved.keys() == written.keys()
    assert all(torch.equal(resaved[k], written[k]) for k in written)


def test_norms_are_ones_and_weights_are_seeded(tmp_path):
    shape = (32, 64)
    a = synthetic.intended("model.layers.0.mlp.gate.weight", shape, torch.bfloat16, seed=0)
    assert torch.equal(a, synthetic.intended("model.layers.0.mlp.gate.weight", shape, torch.bfloat16, seed=0))
    assert not torch.equal(a, synthetic.intended("model.layers.1.mlp.gate.weight", shape, torch.bfloat16, seed=0))
    assert not torch.equal(a, synthetic.intended("model.layers.0.mlp.gate.weight", shape, torch.bfloat16, seed=1))
    assert abs(a.float().std().item() - synthetic.STD) < 0.002
    assert torch.equal(synthetic.intended("model.norm.weight", (64,), torch.bfloat16, 0), torch.ones(64, dtype=torch.bfloat16))


def test_an_existing_folder_is_never_overwritten(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="exists"):
        synthetic.write(tmp_path / "taken", synthetic.make_config("qwen3_moe", **TINY))
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_presets_have_the_sizes_the_benchmark_needs():
    """From the meta device alone: s24 is ~7.7 B parameters (~15 GB), s48 twice the layers, big over 24 GiB."""
    sizes = {}
    for name, preset in synthetic.PRESETS.items():
        model = synthetic.meta_model(synthetic.make_config("qwen3_moe", **preset))
        state, split = synthetic.layout(model, "2GB")
        sizes[name] = split.metadata["total_size"]
        assert sizes[name] == 2 * model.num_parameters()  # all bf16, nothing tied
        # The writer holds one shard at a time, so no shard may exceed the limit.
        shard_bytes = [sum(state[n].numel() * 2 for n in names) for names in split.filename_to_tensors.values()]
        assert max(shard_bytes) <= 2e9 and sum(shard_bytes) == sizes[name]
    assert 14e9 < sizes["s24"] < 16e9
    assert abs(sizes["s48"] / sizes["s24"] - 2) < 0.01
    assert sizes["big"] > 24 * 2**30
