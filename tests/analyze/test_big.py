"""A model the size of the big ones in shape (256 experts, top-8, 60 MoE layers; tiny
widths): every figure is drawn, stays a readable size, and the whole report is written."""

from __future__ import annotations

import struct

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moekit.analyze import analyze
from moekit.analyze.report import write
from moekit.zoo.tiny import randomize_


def _png_size(data: bytes) -> tuple[int, int]:
    return struct.unpack(">II", data[16:24])


def test_256_experts_60_layers(tmp_path):
    config = AutoConfig.for_model("mixtral", vocab_size=384, hidden_size=16, intermediate_size=4,
                                  num_hidden_layers=60, num_attention_heads=2, num_key_value_heads=1,
                                  num_local_experts=256, num_experts_per_tok=8, max_position_embeddings=256)
    model = randomize_(AutoModelForCausalLM.from_config(config)).eval()
    gen = torch.Generator().manual_seed(5)
    data = {"a": torch.randint(3, 200, (2, 256), generator=gen), "b": torch.randint(150, 380, (2, 256), generator=gen)}
    result = analyze(model, data, progress=False)
    assert len(result.layers) == 60 and result.layers[0]["num_experts"] == 256
    written = write(tmp_path / "out", [result])
    assert len(written["figures"]) == 7
    for figure in written["figures"]:
        width, height = _png_size((tmp_path / "out" / figure).read_bytes())
        assert width <= 1600 and height <= 700, (figure, width, height)  # summaries, not a 256 × 60 wall
