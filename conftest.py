"""What every test shares, the library's (tests/) and the benchmarks' (benchmarks/tests/): a fixed thread count and a
seeded torch RNG before each test. Fixtures of one suite live in its own conftest.py."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def seed() -> int:
    """Seed torch's global RNG before every test."""
    torch.manual_seed(0)
    return 0
