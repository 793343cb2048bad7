"""Atomic output folders: complete or absent, never written into, readable as the umask says."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from moekit.errors import MoekitError
from moekit.io.save import atomic_dir


def test_the_folder_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("interrupted")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "done.txt").write_text("x")
        assert not out.exists()
    assert (out / "done.txt").read_text() == "x"
    with pytest.raises(MoekitError, match="already exists"):
        with atomic_dir(out):
            pass


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_the_modes_the_umask_asks_for(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
            (tmp / "sub").mkdir()
            (tmp / "sub" / "card.md").write_text("x")
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "sub/card.md"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o666 & ~umask


def test_replace_swaps_an_owned_folder_only_once_the_new_one_is_complete(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "v1.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, replace=True) as tmp:
            (tmp / "v2.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert [p.name for p in out.iterdir()] == ["v1.txt"]  # the old one is untouched
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "v2.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["v2.txt"] and [p.name for p in tmp_path.iterdir()] == ["model"]
