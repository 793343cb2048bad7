"""Shared fixtures: every supported family as a tiny random model."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from moekit.zoo.tiny import TINY_CONFIGS, tiny_model  # noqa: E402

# Tiny models gain nothing from threads, and OpenMP threads that spin against any other
# busy process on a small machine make them 100x slower (measured on 2 cores).
torch.set_num_threads(1)

FAMILIES = sorted(TINY_CONFIGS)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    """A fresh tiny model of ``family`` (tests may edit it)."""
    return tiny_model(family, seed=0)


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def removed_share(preset: str) -> float:
    """The share of experts a preset removes, from its name: prune-50-w4 removes half; w4a16
    and skip-50 (fewer experts per token, every expert kept) remove none."""
    import re

    share = re.match(r"(?:prune|reap|merge)-(\d\d)", preset)
    return int(share.group(1)) / 100 if share else 0.0
