"""lm-eval tasks shipped with moekit: YAML definitions with their data beside them.

They run offline (their data is in the package), so they are what ``moekit eval
--tasks`` can always run; lm-eval's built-in tasks fetch their data from the hub.
"""

from __future__ import annotations

from pathlib import Path

import yaml

TASKS_DIR = Path(__file__).parent


def shipped_task_files() -> dict[str, Path]:
    """Task name -> YAML file, for every task shipped in this folder."""
    out = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        out[config["task"]] = path
    return out


def shipped_task_names() -> list[str]:
    return list(shipped_task_files())


def stage_shipped_tasks(directory: Path) -> Path:
    """Write the shipped task YAMLs into ``directory`` with absolute data paths.

    lm-eval hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset``, which
    resolves relative paths against the working directory, not the YAML's folder; the
    shipped YAMLs name their data relative to themselves so that they stay readable
    and relocatable, and this turns those names into absolute paths of the installed
    package. The shipped YAMLs are plain YAML (no ``!function`` tags), so a
    safe_load/dump round trip keeps them whole.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for path in shipped_task_files().values():
        config = yaml.safe_load(path.read_text())
        files = config.get("dataset_kwargs", {}).get("data_files")
        if isinstance(files, dict):
            config["dataset_kwargs"]["data_files"] = {
                split: str((path.parent / name).resolve()) for split, name in files.items()
            }
        elif isinstance(files, str):
            config["dataset_kwargs"]["data_files"] = str((path.parent / files).resolve())
        (directory / path.name).write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return directory
