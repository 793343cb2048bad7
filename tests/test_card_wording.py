"""The model card and the CLI say what the output stores and what an evaluation scored."""

from moekit.io.card import eval_tokens, model_card, stored_as

W4A16 = {"steps": [{"type": "quantize", "bits": 4, "expert_bits": None, "average_bits": None,
                    "targets": ["linear", "experts"]}]}


def _report(recipe, after_experts):
    sizes = {"total_params": 1000, "active_params": 500, "bytes": 4000, "experts_per_token": 2}
    return {"model": "some/model", "recipe": recipe, "data_shape": [8, 64], "data_source": "stdlib:calib",
            "data_fingerprint": "abc", "dtype": "bfloat16", "format": "compressed-tensors",
            "before": {**sizes, "experts_per_layer": {"0": 8}}, "after": {**sizes, "experts_per_layer": after_experts}}


def test_a_quantized_output_says_its_bits_and_lists_no_kept_experts():
    card = model_card(_report(W4A16, {"0": 8}))
    assert "| bytes as stored (output: 4-bit Linear and expert weights, the rest bfloat16) |" in card
    assert "Experts kept" not in card  # none were removed
    pruned = model_card(_report({"steps": [{"type": "prune", "keep": 4}]}, {"0": 4}))
    assert "| bytes as stored (output: bfloat16) |" in pruned and "Experts kept in each layer" in pruned


def test_stored_as_names_each_width():
    mixed = {"steps": [{"type": "quantize", "bits": 8, "expert_bits": None, "average_bits": 2.5,
                        "targets": ["linear", "experts"]}]}
    assert stored_as({"recipe": mixed, "dtype": "float32"}) == \
        "8-bit Linear weights and 2.5-bit on average expert weights, the rest float32"
    only = {"steps": [{"type": "quantize", "bits": 4, "expert_bits": 3, "average_bits": None, "targets": ["experts"]}]}
    assert stored_as({"recipe": only, "dtype": "bfloat16"}) == "3-bit expert weights, the rest bfloat16"


def test_an_evaluation_says_how_many_tokens_it_predicted():
    """128 rows of 256 tokens: each row's first token is not predicted, so 32,640."""
    assert eval_tokens({"tokens": 128 * 255, "rows": 128, "row_length": 256}) == \
        "32,640 tokens predicted: 128 rows of 256"
    assert eval_tokens({"tokens": 510}) == "510 tokens predicted"  # a report.json from before rows were kept
