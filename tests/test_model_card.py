"""The model card written with a compressed model states what the report holds."""

from moekit.io.card import model_card


def _sizes(counts):
    return {"total_params": 1000, "active_params": 500, "bytes": 4000, "experts_per_layer": counts,
            "experts_per_token": 2.0}


def test_the_card_lists_the_experts_of_every_layer():
    """A global budget keeps a different count in each layer: the card gives each, in layer
    order (indices as report.json stores them, as strings, so "10" comes after "2")."""
    after = {"1": 3, "2": 5, "10": 4, "3": 3}
    report = {"model": "some/model", "recipe": {"steps": [{"type": "prune", "keep": 4, "budget": "global"}]},
              "data_shape": [8, 64], "data_source": "stdlib:calib", "data_fingerprint": "abc", "dtype": "bfloat16",
              "before": _sizes({k: 8 for k in after}), "after": _sizes(after), "format": "moekit-nonuniform"}
    row = next(line for line in model_card(report).splitlines() if line.startswith("| experts per MoE layer"))
    assert row == "| experts per MoE layer (layers 1, 2, 3, 10) | 8, 8, 8, 8 | 3, 5, 3, 4 |"
