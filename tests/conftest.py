"""Shared pytest fixtures. Everything is built locally; no Hub access."""

from __future__ import annotations

import pytest
import torch

from hmt_adapter import testing as hmt_testing

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed torch's global RNG before every test."""
    torch.manual_seed(0)
    return 0


@pytest.fixture
def tiny_llama():
    """A fresh tiny Llama causal LM (float32, train mode as from_config leaves it)."""
    return hmt_testing.tiny_causal_lm("llama", seed=0)


@pytest.fixture
def tiny_tokenizer():
    """The default 128-token word-level tokenizer (ids match the tiny model configs)."""
    return hmt_testing.tiny_tokenizer()
