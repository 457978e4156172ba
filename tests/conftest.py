"""Shared pytest fixtures of the library's tests (the thread count and the per-test seed are the repository's
conftest.py). Everything is built locally; no Hub access."""

from __future__ import annotations

import pytest

from hmt_adapter import testing as hmt_testing


@pytest.fixture
def tiny_llama():
    """A fresh tiny Llama causal LM (float32, train mode as from_config leaves it)."""
    return hmt_testing.tiny_causal_lm("llama", seed=0)


@pytest.fixture
def tiny_tokenizer():
    """The default 128-token word-level tokenizer (ids match the tiny model configs)."""
    return hmt_testing.tiny_tokenizer()
