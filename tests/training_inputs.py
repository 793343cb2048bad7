"""What the CLI training tests hand `moekit train`: a tiny Python corpus and a tiny model spec."""

from __future__ import annotations

import json
from pathlib import Path

# A 2-layer OLMoE small enough to train a few steps in a second.
TINY_SPEC = {"family": "olmoe", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
             "num_experts": 4, "top_k": 2, "expert_intermediate_size": 16}


def write_corpus(folder: Path, files: int = 30) -> Path:
    """``files`` small Python modules in ``folder`` (created)."""
    folder.mkdir()
    for i in range(files):
        (folder / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 20)
    return folder


def write_spec(path: Path, spec: dict | None = None, **overrides) -> Path:
    """A model spec file: ``spec`` (default `TINY_SPEC`) with ``overrides``."""
    path.write_text(json.dumps({**(spec or TINY_SPEC), **overrides}))
    return path
