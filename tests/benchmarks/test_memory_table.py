"""benchmarks/memory_table.py: parameter counts from the published configs match the model cards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import memory_table  # noqa: E402

CONFIGS = Path(__file__).parents[2] / "benchmarks" / "configs"

# Total parameters as each model card states them (DeepSeek-V3: the main model, without the
# multi-token-prediction module). A wrong field in a config shows up here.
PUBLISHED_BILLIONS = {"Qwen3-30B-A3B": 30.5, "Mixtral-8x7B-v0.1": 46.7, "Qwen3-235B-A22B": 235.0, "DeepSeek-V3": 671.0}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_totals_match_the_model_cards_and_the_parts_add_up(name):
    row = memory_table.memory_row(name, memory_table.config_from_json(CONFIGS / f"{name}.json"))
    assert row["total_params"] / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.005)
    assert row["bf16_bytes"] == 2 * row["total_params"]
    assert row["largest_layer_fp32_bytes"] == 2 * row["largest_layer_bf16_bytes"] == 4 * row["largest_layer_params"]
    # What is neither a decoder layer nor embeddings/head is the final norm: one vector of hidden_size.
    assert row["other_params"] == row["hidden"]
    assert row["hidden_bytes_per_token"] == 4 * row["hidden"]


def test_deepseek_dense_first_layers_are_smaller_than_its_moe_layers():
    row = memory_table.memory_row("DeepSeek-V3", memory_table.config_from_json(CONFIGS / "DeepSeek-V3.json"))
    # first_k_dense_replace = 3: layers 0-2 are dense MLPs, the largest is an MoE layer after them.
    assert row["largest_layer_index"] >= 3 and row["smallest_layer_params"] < row["largest_layer_params"] / 10


def test_every_config_file_is_in_the_table_with_the_synthetic_presets():
    table = memory_table.rows()
    names = {r["model"] for r in table}
    assert set(PUBLISHED_BILLIONS) | {"synthetic s24", "synthetic s48", "synthetic big"} <= names
    assert "| Qwen3-30B-A3B |" in memory_table.render(table)
