"""`moekit calibrate | compress | eval` on two ranks, as torchrun runs them: one report,
printed and written by rank 0, equal to one process's; and the real `torchrun` launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.distributed import ranks
from tests.distributed.test_equal import root  # noqa: F401 - the tiny checkpoint fixture

DATA = ["--samples", "6", "--seq-len", "32", "--batch-size", "2"]


def _one_and_two(argv: list[str]) -> tuple[dict, list[dict]]:
    one = ranks.command(0, argv[:-1] + [argv[-1] + "-one"])
    two = ranks.run_ranks(ranks.command, 2, argv[:-1] + [argv[-1] + "-two"])
    assert one["code"] == 0 and all(r["result"]["code"] == 0 for r in two), (one, two)
    assert two[1]["result"]["stdout"] == ""  # rank 1 prints nothing
    return one, [r["result"] for r in two]


def test_calibrate_and_compress_commands(root, tmp_path):  # noqa: F811
    model, data = str(root / "model"), str(root / "data")
    _one_and_two(["calibrate", model, "--data", data, *DATA, "--hidden-sample", "50", "-o", str(tmp_path / "stats")])
    one, two = (load_file(tmp_path / f"stats-{n}" / "stats.safetensors") for n in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one if "frequency" in k)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=1e-12)
    _, printed = _one_and_two(["compress", model, "--data", data, "--samples", "16", "--seq-len", "32",  # 2 batches of 8
                               "--recipe", "prune-50", "--json", "-o", str(tmp_path / "out")])
    assert json.loads(printed[0]["stdout"])["out"] == str((tmp_path / "out-two").resolve())
    assert (tmp_path / "out-one" / "model.safetensors").read_bytes() == \
        (tmp_path / "out-two" / "model.safetensors").read_bytes()


def test_eval_command(root, tmp_path):  # noqa: F811
    argv = ["eval", str(root / "model"), "--data", str(root / "data"), "--context-length", "32", "--stride", "16",
            "--max-tokens", "1024", "--batch-size", "4", "--json"]
    one = ranks.command(0, argv)
    two = ranks.run_ranks(ranks.command, 2, argv)
    expected, got = (json.loads(r["stdout"])["models"][str(root / "model")] for r in (one, two[0]["result"]))
    assert got["tokens"] == expected["tokens"] and got["accuracy"] == expected["accuracy"]
    assert abs(got["nll"] - expected["nll"]) <= 1e-12 * expected["nll"]
    assert two[1]["result"]["stdout"] == ""


def test_torchrun(root, tmp_path):  # noqa: F811
    """The real launcher: `torchrun --nproc-per-node 2 -m moekit calibrate`."""
    out = tmp_path / "stats"
    run = subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc-per-node", "2",
                          "--master-port", str(ranks.free_port()), "-m", "moekit", "calibrate", str(root / "model"),
                          "--data", str(root / "data"), *DATA, "--threads", "1", "--json", "-o", str(out)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "MOEKIT_DIST_TIMEOUT": "60"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["tokens"] == 6 * 32  # one report (rank 0's), over every rank's rows
    ranks.command(0, ["calibrate", str(root / "model"), "--data", str(root / "data"), *DATA, "-o", str(tmp_path / "one")])
    one, two = load_file(tmp_path / "one" / "stats.safetensors"), load_file(out / "stats.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-6, atol=1e-12)
