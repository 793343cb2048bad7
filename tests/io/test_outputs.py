"""Which failures are failed writes (`moekit.io.outputs.write_error`): the errors only a
write gives, whatever file they name; a permission error only on the output's own files,
never on an input (which must stay a traceback or its own message, not "disk full").
The CLI's handling of each, in real processes, is in tests/cli/test_outputs.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError

from moekit.io.outputs import write_error

OUT = Path("/data/runs/out")


@pytest.mark.parametrize("exc, says", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "the disk is full"),  # no file named: still a write
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "/elsewhere/x"), "the file system is read-only"),
    (OSError(errno.EACCES, "Permission denied", "/data/runs/.out.moekit-work/done/00001.json"), "permission denied"),
    (OSError(errno.EACCES, "Permission denied", "/data/runs/out/model.safetensors"), "permission denied"),
    (SafetensorError("Error while serializing: I/O error: File too large (os error 27)"), "a file outgrew"),
])
def test_failed_writes(exc, says):
    assert says in write_error(exc, OUT)[0]


@pytest.mark.parametrize("exc", [
    OSError(errno.EACCES, "Permission denied", "/data/model/model.safetensors"),  # reading an input
    OSError(errno.EACCES, "Permission denied", "/data/runs/outer/x"),  # a neighbour whose name starts alike
    OSError(errno.ENOENT, "No such file or directory", "/data/runs/out/x"),
    SafetensorError("Error while deserializing header: HeaderTooLarge"),
    ValueError("28 requested and 0 written"),
])
def test_other_failures_are_not(exc):
    assert write_error(exc, OUT) is None


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_numpy_short_write_is_one():
    """numpy's tofile (spilled hidden states) reports a full disk without an errno: "N
    requested and 0 written". /dev/full is a device every write to fails with ENOSPC."""
    with pytest.raises(OSError) as failed:
        np.zeros(4096, dtype=np.float32).tofile("/dev/full")
    assert failed.value.errno is None and "disk is probably full" in write_error(failed.value, OUT)[0]
