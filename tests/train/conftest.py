"""Tiny training fixtures; every test runs on one thread (the machine is shared)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)

TINY = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
            num_experts=8, top_k=2, expert_intermediate_size=16, max_position_embeddings=64)


def tiny_spec(family: str, **overrides) -> dict:
    return {"family": family, **TINY, **overrides}


@pytest.fixture
def rows() -> torch.Tensor:
    """A learnable toy language: each row counts upward mod 60 from a random start. [48, 16]"""
    gen = torch.Generator().manual_seed(0)
    start = torch.randint(0, 60, (48, 1), generator=gen)
    return (start + torch.arange(16)) % 60 + 3
