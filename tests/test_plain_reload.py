"""The plain-transformers helper every "same logits" test uses fails loudly when loading
warns: a checkpoint that lacks a tensor loads (the tensor newly initialised), with a warning."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit
from moekit.zoo.tiny import tiny_model
from tests.reload import plain_logits


def test_a_loader_warning_fails_the_reload(tmp_path):
    folder = moekit.save(tiny_model("qwen3_moe"), tmp_path / "model")
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(0))
    weights = load_file(folder / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AssertionError, match=r"(?s)loader warning for .*LOAD REPORT.*model.norm.weight.*MISSING"):
        plain_logits(tmp_path, [folder], ids)
