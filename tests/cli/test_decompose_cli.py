"""`moekit compress --recipe decompose-50`: moekit's format that `moekit inspect` reads with
its true sizes; with --materialize a standard checkpoint; --materialize without a decompose
step is refused."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from moekit.cli import app

runner = CliRunner()
MODEL = "moekit/tiny-qwen3_moe"
SMALL = ["--samples", "4", "--seq-len", "32", "--json"]


def test_decompose_then_inspect_and_materialize(tmp_path):
    result = runner.invoke(app, ["compress", MODEL, "--recipe", "decompose-50", "-o", str(tmp_path / "f"), *SMALL])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "moekit-factored" and (tmp_path / "f" / "moekit.json").is_file()
    shown = runner.invoke(app, ["inspect", str(tmp_path / "f"), "--json"])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.stdout)
    assert summary["total_params"] == report["after"]["total_params"]
    assert summary["routed_params"] <= report["before"]["routed_params"] // 2
    assert all(layer["factored"] for layer in summary["layers"] if layer["kind"] == "moe")
    table = runner.invoke(app, ["inspect", str(tmp_path / "f")])
    assert "low-rank factors" in table.stdout

    result = runner.invoke(app, ["compress", MODEL, "--recipe", "decompose-50", "--materialize", "-o",
                                 str(tmp_path / "m"), *SMALL])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "standard" and (tmp_path / "m" / "model.safetensors").is_file()
    assert report["after"]["total_params"] == report["before"]["total_params"]


def test_materialize_without_decompose_is_refused(tmp_path):
    result = runner.invoke(app, ["compress", MODEL, "--recipe", "prune-50", "--materialize", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "--materialize applies to decompose steps" in result.output
    assert not (tmp_path / "x").exists()
