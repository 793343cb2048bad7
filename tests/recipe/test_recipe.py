"""Recipes round-trip YAML; invalid recipes fail precisely, before any weights load."""

from __future__ import annotations

import re

import pytest

import moekit
from tests.conftest import removed_share
from moekit.recipe.recipe import model_info
from moekit.errors import MoekitError
from moekit.recipe import Recipe, load_recipe, presets
from moekit.zoo.tiny import tiny_config


def test_presets_load_and_round_trip():
    assert {"prune-25", "prune-50", "reap-25", "reap-50", "merge-25", "merge-50"} <= set(presets())
    for name in presets():
        recipe = load_recipe(name)
        assert Recipe.from_yaml(recipe.to_yaml()) == recipe


@pytest.mark.parametrize("name", sorted(presets()))
def test_every_preset_plans_on_the_reference_model(name):
    """Each preset removes its share (the -NN of its name) of every layer of ref-fine's 32
    experts, in a standard checkpoint, and says what it does in its first line."""
    first = presets()[name].read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 40
    planned = moekit.plan("moekit/ref-fine", name)
    kept = 32 - round(32 * removed_share(name))
    assert planned["exact_per_layer"] and set(planned["after"]["experts_per_layer"].values()) == {kept}
    before, after = planned["before"]["routed_params"], planned["after"]["routed_params"]
    if name.startswith("decompose-"):  # every expert kept, NN% of their parameters (within a rank per projection)
        share = int(name.removeprefix("decompose-")) / 100
        assert share * before * 0.99 < after <= share * before
    else:
        assert after * 32 == before * kept


def test_merge_presets_are_the_best_merge_measured_on_ref_fine():
    """HC-SMoE groups, aligned, usage-weighted, mean router rows, refit: BENCHMARKS.md's best
    merge on ref-fine at 25% and 50%."""
    for name, remove in (("merge-25", 0.25), ("merge-50", 0.5)):
        (step,) = load_recipe(name).steps
        assert (step.type, step.remove, step.grouping, step.align, step.weights, step.router, step.refit) == (
            "merge", remove, "hcsmoe", True, "frequency", "mean", True)


def test_yaml_round_trip_keeps_every_field(tmp_path):
    text = "steps:\n  - type: prune\n    method: reconstruction\n    keep: 4\n    beam_width: 2\n    budget: global\n"
    recipe = Recipe.from_yaml(text)
    step = recipe.steps[0]
    assert (step.method, step.keep, step.beam_width, step.budget) == ("reconstruction", 4, 2, "global")
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    assert load_recipe(tmp_path / "r.yaml") == recipe
    assert recipe.needs() == {"hidden_sample", "reap"}


def test_refit_asks_for_the_largest_hidden_sample():
    prune = Recipe.from_yaml("steps:\n  - type: prune\n    method: reconstruction\n    keep: 4\n    samples: 512\n"
                             "    refit: true\n    refit_samples: 2048\n").steps[0]
    assert prune.needs() == {"hidden_sample", "reap"} and prune.hidden_sample() == 2048
    merge = Recipe.from_yaml("steps:\n  - type: merge\n    keep: 4\n    refit: true\n").steps[0]
    assert "hidden_sample" in merge.needs() and merge.hidden_sample() == 8192
    assert Recipe.from_yaml(Recipe(steps=[prune, merge]).to_yaml()).steps == [prune, merge]


@pytest.mark.parametrize("text, message", [
    ("steps:\n  - type: prune\n    keep: 4\n    refit: true\n    refit_ridge: -1\n",
     "refit_ridge: Input should be greater than or equal to 0"),
    ("steps:\n  - type: prun\n", "unknown step type 'prun'"),
    ("steps:\n  - type: prune\n    keep: 4\n    colour: red\n", "colour: Extra inputs are not permitted"),
    ("steps:\n  - type: prune\n    remove: 1.5\n", "remove: Input should be less than 1"),
    ("steps:\n  - type: prune\n    remove: 0\n", "remove: Input should be greater than 0"),
    ("steps:\n  - type: prune\n", "exactly one of 'keep'"),
    ("steps:\n  - type: prune\n    keep: 2\n    remove: 0.5\n", "exactly one of 'keep'"),
    ("steps:\n  - type: prune\n    method: vibes\n    keep: 2\n", "method"),
    ("steps: []\n", "non-empty 'steps'"),
    ("stages:\n  - type: prune\n", "non-empty 'steps'"),
    ("steps:\n  - type: prune\n    keep: [\n", "not valid YAML"),
])
def test_invalid_recipes(text, message):
    with pytest.raises(MoekitError, match=message.replace("[", r"\[").replace("(", r"\(")):
        Recipe.from_yaml(text)


def test_unknown_recipe_name():
    with pytest.raises(MoekitError, match="not a preset"):
        load_recipe("prune-99")


@pytest.mark.parametrize("keep, message", [
    (9, "has only 8 experts"),
    (8, "removes nothing"),
    (1, "fewer than top-k = 2"),
])
def test_checks_against_the_config(keep, message):
    recipe = Recipe.from_dict({"steps": [{"type": "prune", "keep": keep}]})
    with pytest.raises(MoekitError, match=message):
        recipe.steps[0].check(model_info(tiny_config("mixtral")))


def test_group_limited_models_need_a_multiple_of_the_groups():
    recipe = Recipe.from_dict({"steps": [{"type": "prune", "keep": 3}]})
    with pytest.raises(MoekitError, match="multiple of 2"):
        recipe.steps[0].check(model_info(tiny_config("deepseek_v3")))


@pytest.mark.parametrize("family, message", [
    ("deepseek_v3", "ranks its 2 expert groups by their two best experts; keep at least 2 per group (4 in all)"),
    ("deepseek_v2", "1 chosen groups x 1 experts cannot supply top-k = 2; keep at least 2 per group (4 in all)"),
])
def test_group_limited_routing_is_checked_before_weights_load_as_the_edit_would(family, message):
    """keep=2 of 8 in 2 groups is a multiple of the groups, yet leaves one expert per group:
    refused by the recipe check with the same reason `keep_experts` gives."""
    from moekit.arch.edit import keep_experts
    from moekit.zoo.tiny import tiny_model

    step = Recipe.from_dict({"steps": [{"type": "merge", "keep": 2}]}).steps[0]
    with pytest.raises(MoekitError, match="^merge: .*" + re.escape(message)):
        step.check(model_info(tiny_config(family)))
    model = tiny_model(family)
    with pytest.raises(MoekitError, match=re.escape(message)):
        keep_experts(model, {layer.index: [0, 4] for layer in moekit.moe_layers(model)})


def test_an_exhaustive_search_too_large_to_finish_is_refused_up_front():
    from moekit.io.load import load_config
    from moekit.methods.prune.reconstruction import count_candidates

    info = model_info(tiny_config("mixtral"))  # 8 experts: C(8, 4) = 70 sets, fine
    Recipe.from_dict({"steps": [{"type": "prune", "method": "reconstruction", "search": "exhaustive",
                                 "keep": 4}]}).steps[0].check(info)
    fine = model_info(load_config("moekit/ref-fine"))  # 32 experts, keep 16: C(32, 16) sets
    step = Recipe.from_dict({"steps": [{"type": "prune", "method": "reconstruction", "search": "exhaustive",
                                        "keep": 16}]}).steps[0]
    with pytest.raises(MoekitError, match=f"would score {count_candidates(32, 16):,} candidate sets"):
        step.check(fine)
