"""The work folder of a long run: what is finished survives a crash, and the run resumes.

A streamed compress keeps, next to its output, a hidden folder ``.<out>.moekit-work/``:

- ``run.json``: the fingerprint of everything the result depends on (the checkpoint's
  files, the recipe, the data, the settings, moekit's version) — a work folder made by
  another run is refused;
- ``plans.json``: decisions taken across layers by a first pass (a global budget);
- ``layer-NNNNN.safetensors``: each finished decoder layer's output shard;
- ``done/NNNNN.json``: written last for a layer, it is the commit point: the layer's
  report, its final expert count and its routers' digests;
- ``hidden-NNNNN/``: the hidden states leaving the last finished layer, which the next
  layer needs (older ones are deleted once a newer one is committed).

Every file is written under a temporary name and renamed, so a kill at any moment
(SIGKILL included) leaves either the old state or the new one. Resuming continues at the
first layer without a ``done`` record and gives a bitwise-identical result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from moekit.errors import MoekitError
from moekit.io.outputs import folder_size, remove_partial, size_text

SUFFIX = ".moekit-work"


def work_folder_for(out: Path) -> Path:
    return out.parent / f".{out.name}{SUFFIX}"


def run_fingerprint(facts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class WorkFolder:
    """The work folder of one run (see the module docstring).

    Args:
        path: the folder.
        facts: what the run depends on (JSON-able); its digest must match to resume.
        resume: continue an existing folder; without it an existing folder is refused.
    """

    def __init__(self, path: Path, facts: dict[str, Any], *, resume: bool) -> None:
        self.path = path
        self.fingerprint = run_fingerprint(facts)
        record = path / "run.json"
        if path.exists():
            if not resume:
                raise MoekitError(
                    f"{path} holds an unfinished earlier run of this command ({self._progress()}). "
                    f"Add --resume to continue it, or delete that folder to start over."
                )
            try:
                earlier = json.loads(record.read_text())
            except (OSError, json.JSONDecodeError):
                earlier = {}
            if not isinstance(earlier, dict) or earlier.get("fingerprint") != self.fingerprint:
                raise MoekitError(
                    f"{path} was made by a run with {_differences(earlier, facts)}; it cannot be resumed with "
                    f"these. Delete it to start over, or rerun the original command."
                )
        else:
            try:
                (path / "done").mkdir(parents=True)
                _write_json(record, {"fingerprint": self.fingerprint, "facts": facts})
            except BaseException:  # a folder without run.json would be refused as another run's
                self.remove()
                raise
        self.resumed = resume and self.finished_layers() != []

    def _progress(self) -> str:
        done = self.finished_layers()
        return f"layers 0..{done[-1]} finished" if done else "no layer finished yet"

    # -- records ----------------------------------------------------------------------
    def finished_layers(self) -> list[int]:
        folder = self.path / "done"
        if not folder.is_dir():
            return []
        return sorted(int(p.stem) for p in folder.glob("*.json"))

    def record(self, index: int) -> dict:
        return json.loads((self.path / "done" / f"{index:05d}.json").read_text())

    # A run across torch.distributed ranks keeps the hidden states before the last finished
    # layer too: a rank that died while committing a layer the others had committed makes
    # them step back one layer (`forget`) to resume together (`moekit.distributed.runs`).
    keep_previous = False

    def commit(self, index: int, record: dict) -> None:
        """Mark layer ``index`` finished (its shard and hidden states written before)."""
        _write_json(self.path / "done" / f"{index:05d}.json", record)
        kept = {f"hidden-{index:05d}", *([f"hidden-{index - 1:05d}"] if self.keep_previous else [])}
        for older in self.path.glob("hidden-*"):
            if older.name not in kept:
                shutil.rmtree(older, ignore_errors=True)

    def forget(self, index: int) -> None:
        """Mark the last finished layer ``index`` unfinished: a resumed run redoes it from
        the hidden states before it (kept with ``keep_previous``)."""
        (self.path / "done" / f"{index:05d}.json").unlink()
        shutil.rmtree(self.hidden_folder(index), ignore_errors=True)

    def hidden_folder(self, index: int) -> Path:
        return self.path / f"hidden-{index:05d}"

    def plans(self) -> dict | None:
        path = self.path / "plans.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_plans(self, plans: dict) -> None:
        _write_json(self.path / "plans.json", plans)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def keep_or_remove(self) -> str:
        """After a failed write (a full disk): keep what ``--resume`` continues from, delete
        the rest (half-written files, hidden states spilled for this session only), or the
        whole folder when no layer was finished. Says which, in a sentence."""
        shutil.rmtree(self.path / "activations", ignore_errors=True)  # rewritten by every session
        remove_partial(self.path)
        done = self.finished_layers()
        for hidden in self.path.glob("hidden-*"):  # written, but its layer not committed: redone on resume
            if not done or int(hidden.name.removeprefix("hidden-")) > done[-1]:
                shutil.rmtree(hidden, ignore_errors=True)
        if not done and not self.plans():  # nothing a resumed run would skip
            self.remove()
            return f"No layer was finished, so the work folder {self.path} was removed."
        finished = f"layers 0..{done[-1]}" if done else "the plan of the first pass"
        return (f"The work folder {self.path} keeps {finished} ({size_text(folder_size(self.path))}): rerun the same "
                "command with --resume to continue from there, or delete that folder.")


def _differences(earlier: Any, facts: dict[str, Any]) -> str:
    """What differs between the run that made a work folder and this one, each fact named,
    old → new where both are short (a recipe, a fingerprint of many files, is only named)."""
    before = earlier.get("facts") if isinstance(earlier, dict) else None
    if not isinstance(before, dict):  # unreadable, or written before run.json kept the facts
        return "another model, recipe, data, settings or moekit version (its run.json does not say which)"
    now = json.loads(json.dumps(facts, default=str))  # as run.json holds them

    def shown(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    changes = []
    for key in sorted(before.keys() | now.keys(), key=lambda k: (list(now).index(k) if k in now else len(now), k)):
        old, new = before.get(key), now.get(key)
        if old == new:
            continue
        if old is not None and new is not None and max(len(shown(old)), len(shown(new))) <= 40:
            changes.append(f"{key} {shown(old)} → {shown(new)}")
        else:
            changes.append(f"another {key}")
    return ", ".join(changes) or "other settings"


def _write_json(path: Path, data: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
