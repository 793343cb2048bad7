"""The `moekit` command itself: its version and its help."""

from importlib.metadata import version

from typer.testing import CliRunner

import moekit
from moekit.cli import app

runner = CliRunner()


def test_version_is_the_installed_distributions():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith(f"moekit {version('moekit')} (transformers ")
    assert moekit.__version__ == version("moekit")


def test_no_arguments_lists_every_command():
    result = runner.invoke(app, [])
    for command in ("analyze", "calibrate", "combine", "compress", "eval", "inspect", "run", "split", "train",
                    "upcycle"):
        assert command in result.output
