"""Ranks that disagree are refused before any work; a rank that dies or hangs stops the
others with a clear message within the timeout; the run then resumes from the last layer
every rank finished, to the checkpoint one process writes."""

from __future__ import annotations

import os
import subprocess
import sys

from safetensors.torch import load_file

from moekit.io.workdir import work_folder_for
from tests.distributed import ranks
from tests.distributed.test_equal import root  # noqa: F401 - the tiny checkpoint fixture


def test_a_rank_with_another_recipe_is_refused(root, tmp_path):  # noqa: F811
    results = ranks.run_ranks(ranks.compress, 2, root, ["prune-50", "merge-50"], tmp_path / "out")
    for r in results:
        assert "MoekitError" in r["error"] and "rank(s) 1 were given another recipe than rank 0" in r["error"], r
    assert not (tmp_path / "out").exists()


def test_a_killed_rank_stops_the_run_and_it_resumes(root, tmp_path):  # noqa: F811
    one = ranks.compress(0, root, "prune-50", tmp_path / "one")
    out = tmp_path / "two"
    killed, survivor = reversed(ranks.run_ranks(ranks.compress, 2, root, "prune-50", out, 0, dist_timeout=20))
    assert killed == {"exitcode": -9}
    assert "another rank stopped or did not answer" in survivor["error"] and survivor["seconds"] < 20, survivor
    assert not out.exists() and work_folder_for(out).is_dir()
    resumed = ranks.run_ranks(ranks.compress, 2, root, "prune-50", out, None, True)
    assert all("result" in r for r in resumed), resumed
    assert resumed[0]["result"]["steps"] == one["steps"]
    assert load_file(out / "model.safetensors").keys() == load_file(tmp_path / "one" / "model.safetensors").keys()
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "one" / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # every rank's work folder removed


def test_a_hung_rank_stops_the_others_after_the_timeout(root, tmp_path):  # noqa: F811
    results = ranks.run_ranks(ranks.compress, 2, root, "prune-50", tmp_path / "out", 0, False, True,
                              dist_timeout=2, timeout=30)
    survivor = results[0]
    assert "did not answer within 2s" in survivor["error"], survivor
    assert survivor["seconds"] < 15


def test_ranks_one_layer_apart_resume_together(tmp_path):
    """A rank killed while committing a layer the others had committed leaves them one
    layer ahead: they step back to its last layer; further apart is refused."""
    results = ranks.run_ranks(ranks.progress_agreement, 2, tmp_path / "a", [[0, 1, 2], [0, 1]])
    assert [r["result"] for r in results] == [[0, 1], [0, 1]]
    results = ranks.run_ranks(ranks.progress_agreement, 2, tmp_path / "b", [[0], []])
    assert [r["result"] for r in results] == [[], []]
    results = ranks.run_ranks(ranks.progress_agreement, 2, tmp_path / "c", [[0, 1, 2], [0]])
    assert all("rank 0: 0..2, rank 1: 0..0" in r["result"] for r in results), results


def test_what_does_not_run_across_ranks_is_refused(root, tmp_path):  # noqa: F811
    for argv in (["inspect", str(root / "model")], ["eval", str(root / "model"), "--speed"]):
        assert [r["result"]["code"] for r in ranks.run_ranks(ranks.command, 2, argv)] == [2, 2], argv


def test_a_refusal_under_torchrun_is_printed_once(tmp_path):
    """The real launcher, two ranks: the refusal every rank reaches is printed once (by the
    first rank of the node) and each rank exits 2; torchrun's own summary, and its exit
    code 1, are the launcher's and follow whatever the ranks do (docs/distributed.md).
    A refusal once the group is joined goes through the same `error` (15 s more to
    launch: not repeated here)."""
    argv, refusal = ["inspect", "moekit/tiny-mixtral"], "error: moekit inspect does not share its work across ranks"
    # torchrun looks at its ranks every 3 s, not 0.1 s: both reach the refusal before it ends the other
    run = subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc-per-node", "2",
                          "--monitor-interval", "3", "--master-port", str(ranks.free_port()), "-m", "moekit", *argv],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.stderr.count(refusal) == 1, run.stderr
    assert run.stderr.count("exitcode  : 2 ") == 2 and run.returncode == 1, run.stderr  # both ranks, then torchrun
    assert run.stdout == "" and list(tmp_path.iterdir()) == []
