"""`moekit.plan` / `moekit compress --plan`: sizes from the config alone, nothing read or written.

That the planned sizes equal what compression reports, on every family, in bf16 and with a
global budget, is tested beside compression (tests/test_compress.py), which has the outputs.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import moekit
from moekit.cli import app
from moekit.errors import MoekitError
from moekit.planning import _spread_ids

runner = CliRunner()


def test_spread_ids_take_the_same_number_from_every_routing_group():
    assert _spread_ids(8, 4, 1) == [0, 1, 2, 3]
    assert _spread_ids(8, 4, 2) == [0, 1, 4, 5]
    assert _spread_ids(8, 8, 4) == list(range(8))
    with pytest.raises(MoekitError, match="evenly from 4 routing groups"):
        _spread_ids(8, 6, 4)


def test_a_plan_reads_no_weights_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["compress", "--plan", "--json"])  # the shipped reference, prune-50
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["dtype"] == "bfloat16" and report["exact_per_layer"] and not report["notes"]
    assert set(report["after"]["experts_per_layer"].values()) == {16}
    assert report["after"]["bytes"] < report["before"]["bytes"]
    assert list(tmp_path.iterdir()) == []
    table = runner.invoke(app, ["compress", "--plan", "-r", "reap-25"])
    flat = " ".join(table.stdout.split())  # rich wraps the title
    assert table.exit_code == 0 and "(planned, no weights read)" in flat and "│ 32 │ 24 │" in flat


def test_the_two_step_recipe_is_planned_step_after_step():
    recipe = {"steps": [{"type": "prune", "remove": 0.5}, {"type": "merge", "keep": 4}]}
    planned = moekit.plan("moekit/ref-fine", recipe)
    assert set(planned["after"]["experts_per_layer"].values()) == {4}


def test_a_bad_recipe_or_dtype_is_refused_as_compress_refuses_it():
    with pytest.raises(MoekitError, match="fewer than top-k"):
        moekit.plan("moekit/ref-fine", {"steps": [{"type": "prune", "keep": 2}]})
    with pytest.raises(MoekitError, match="dtype 'int4'"):
        moekit.plan("moekit/ref-fine", "prune-50", dtype="int4")


def test_each_step_is_checked_against_what_the_steps_before_it_leave(tmp_path):
    recipe = {"steps": [{"type": "prune", "keep": 16}, {"type": "merge", "keep": 24}]}
    with pytest.raises(MoekitError, match=r"recipe: step 2 \(merge\): keep=24 but the model has only 16 experts"):
        moekit.plan("moekit/ref-fine", recipe)
    with pytest.raises(MoekitError, match=r"step 2 \(merge\): keep=24 but the model has only 16"):  # as compress does
        moekit.compress("moekit/ref-fine", recipe, out_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
