"""Ranks that disagree are refused before any work; a rank that dies or hangs stops the
others with a clear message within the timeout; the run then resumes from the last layer
every rank finished, to the checkpoint one process writes."""

from __future__ import annotations

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
