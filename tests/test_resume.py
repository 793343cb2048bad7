"""A compress killed at any moment (SIGKILL) resumes to a bitwise-identical output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import moekit
import moekit.data
from moekit.recipe import load_recipe
from moekit.errors import MoekitError
from moekit.io.workdir import work_folder_for
from tests.checkpoints import write_checkpoints

GLOBAL = {"steps": [{"type": "prune", "method": "frequency", "keep": 4, "budget": "global"},
                    {"type": "merge", "keep": 3}]}
PRUNE_QUANTIZE = {"steps": [{"type": "prune", "method": "reap", "keep": 4},
                            {"type": "quantize", "bits": 4, "group_size": 8, "router_repair": True}]}

# Runs a compress in a child process that SIGKILLs itself at one event ("layer" k finished,
# or the n-th output file "saved"): a real kill -9 at a known point, not an exception.
_CHILD = """
import os, signal, sys, json
import moekit
model, recipe, out, data, kind, at, resume = sys.argv[1:8]
def on_event(name, index):
    if name == kind and index == int(at):
        os.kill(os.getpid(), signal.SIGKILL)
moekit.compress(model, json.loads(recipe), out_dir=out, data=data, n_samples=6, seq_len=32, progress=False,
                resume=resume == "1", on_event=on_event)
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    def five_layers(config):
        config.num_hidden_layers = 5

    root = write_checkpoints(tmp_path_factory.mktemp("resume"), ["mixtral"], documents=4, edit=five_layers)
    (root / "mixtral").rename(root / "model")
    return root


def _run(source, recipe, out, kind="none", at=-1, resume=False) -> int:
    args = [sys.executable, "-c", _CHILD, str(source / "model"), json.dumps(recipe), str(out), str(source / "data"),
            kind, str(at), "1" if resume else "0"]
    return subprocess.run(args, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "report.json"}


EVERY_POINT = (("layer", 0), ("layer", 2), ("layer", 4), ("saved", 1))  # first, middle, last layer; saving
# each point costs two child processes (~7 s on 2 cores): the other recipes, whose extra state
# (a global plan, GPTQ's Hessians) lives between layers, are killed mid-model and mid-save
INSIDE = (("layer", 2), ("saved", 1))


@pytest.mark.parametrize(("recipe", "points"), [("prune-50", EVERY_POINT), (GLOBAL, INSIDE), (PRUNE_QUANTIZE, INSIDE)],
                         ids=["prune-50", "global-then-merge", "prune-then-gptq"])
def test_killed_anywhere_then_resumed_gives_the_same_bytes(source, tmp_path, recipe, points):
    recipe = {"steps": moekit.Recipe.from_dict(recipe).to_dict()["steps"]} if isinstance(recipe, dict) else \
        load_recipe(recipe).to_dict()
    assert _run(source, recipe, tmp_path / "whole") == 0
    whole = _files(tmp_path / "whole")
    for kind, at in points:
        out = tmp_path / f"{kind}-{at}"
        assert _run(source, recipe, out, kind, at) == -9  # killed
        assert not out.exists() and work_folder_for(out).is_dir()
        assert _run(source, recipe, out, resume=True) == 0
        assert _files(out) == whole, (kind, at)
        assert not work_folder_for(out).exists()  # removed once the output is complete
        report = json.loads((out / "report.json").read_text())
        assert report["steps"] == json.loads((tmp_path / "whole" / "report.json").read_text())["steps"]


def test_a_work_folder_is_refused_without_resume_or_from_another_run(source, tmp_path):
    out = tmp_path / "out"
    assert _run(source, load_recipe("prune-50").to_dict(), out, "layer", 1) == -9
    with pytest.raises(MoekitError, match="--resume"):
        moekit.compress(str(source / "model"), "prune-50", out_dir=out, data=str(source / "data"), n_samples=6,
                        seq_len=32, progress=False)
    # the refusal names what differs, old → new where that is short
    with pytest.raises(MoekitError, match=r"moekit-work was made by a run with another recipe; it cannot be resumed"):
        moekit.compress(str(source / "model"), "prune-25", out_dir=out, data=str(source / "data"), n_samples=6,
                        seq_len=32, progress=False, resume=True)
    with pytest.raises(MoekitError, match=r"made by a run with calibration data \w{16} → \w{16}, seed 0 → 1, "
                                          r"dtype float32 → bfloat16; it cannot"):
        moekit.compress(str(source / "model"), "prune-50", out_dir=out, data=str(source / "data"), n_samples=6,
                        seq_len=32, progress=False, resume=True, seed=1, dtype="bfloat16")
    assert not out.exists()


def test_resume_without_a_work_folder_starts_from_the_beginning(source, tmp_path):
    report = moekit.compress(str(source / "model"), "reap-50", out_dir=tmp_path / "out", data=str(source / "data"),
                             n_samples=6, seq_len=32, progress=False, resume=True)
    assert set(report["after"]["experts_per_layer"].values()) == {4}
