"""A write that fails while a command runs (the disk fills up, a file outgrows the size
limit) ends it with one line and exit code 74, never a traceback: the half-written output
is removed, and compress keeps the layers it finished for ``--resume``, saying where.

"The disk is full" is RLIMIT_FSIZE in the command's process: a write past the limit fails
with EFBIG, as a full disk fails with ENOSPC, for root and anyone else, on any machine.
The sizes below are those of the tiny test model: a layer's shard is ~80 kB, the final
joined ``model.safetensors`` ~255 kB, the statistics ~4 kB.
"""

from __future__ import annotations

from pathlib import Path

from tests.cli.test_errors import moekit  # noqa: F401 - the forked-command fixture

COMPRESS = ["compress", "moekit/tiny-mixtral", "--samples", "8", "--seq-len", "32", "--json"]


def _failed(result: tuple[int, str, str], *says: str) -> str:
    code, out, err = result
    assert code == 74, err
    assert "Traceback" not in err and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: could not write "), err
    for text in says:
        assert text in err, err
    return err


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_compress_keeps_its_finished_layers_and_resume_completes(moekit, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    work = tmp_path / ".out.moekit-work"
    # every layer's shard fits, the joined output does not: the last write fails
    message = _failed(moekit(*COMPRESS, "-o", out, fsize=150_000), f"could not write {out}: a file outgrew",
                      "(File too large)", "The partial output was removed.",
                      f"The work folder {work} keeps layers 0..2 (", "rerun the same command with --resume")
    assert message.rstrip().endswith("or choose an output folder on another disk with -o.")
    assert _left(tmp_path) == [work.name]  # no output, no .out.partial-*: the work folder alone
    assert not list(work.rglob("*.partial")) and not (work / "activations").exists()
    code, _, err = moekit(*COMPRESS, "-o", out, "--resume")
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and _left(tmp_path) == [out.name]


def test_compress_that_finished_no_layer_leaves_nothing(moekit, tmp_path):  # noqa: F811
    out = tmp_path / "deeper" / "out"
    _failed(moekit(*COMPRESS, "-o", out, fsize=20_000), "No layer was finished, so the work folder",
            "was removed.")
    assert _left(tmp_path) == []  # the folder made to hold it went too


def test_calibrate_removes_its_partial_output(moekit, tmp_path):  # noqa: F811
    """safetensors reports the failed write as its own error type, not an OSError."""
    out = tmp_path / "new" / "stats"
    _failed(moekit("calibrate", "moekit/tiny-mixtral", "--samples", "2", "--seq-len", "16", "--json", "-o", out,
                   fsize=3_000), f"could not write {out}: a file outgrew", "The partial output was removed.",
            "Raise the limit (ulimit -f")
    assert _left(tmp_path) == []  # the folder made to hold it went too
