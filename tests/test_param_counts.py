"""The paper's "0.5-2% extra parameters" with default settings, on real configs built on the meta device."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import hmt_adapter  # noqa: F401
from hmt_adapter import HMTConfig
import fixtures


def extra_parameter_percent(name: str) -> tuple[int, int, float]:
    """(backbone params, HMT params, extra %) for ``name``'s real config with the default HMTConfig."""
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(fixtures.real_config(name))
    backbone = sum(p.numel() for p in base.parameters())
    model = peft.get_peft_model(base, HMTConfig(task_type="CAUSAL_LM"))
    hmt = sum(p.numel() for n, p in model.named_parameters() if "hmt_" in n)
    assert hmt == sum(p.numel() for p in model.parameters() if p.requires_grad)
    return backbone, hmt, 100.0 * hmt / backbone


@pytest.mark.parametrize(
    ("name", "width"), [("facebook/opt-350m", 512), ("facebook/opt-2.7b", 2560), ("meta-llama/Llama-2-7b-hf", 4096)]
)
def test_extra_parameters_within_paper_range(name: str, width: int) -> None:
    backbone, hmt, percent = extra_parameter_percent(name)
    assert backbone == fixtures.REAL_PARAM_COUNTS[name]
    h = HMTConfig().recall_dim
    assert hmt == 2 * width + 2 * h * width + width * width  # m_0, s, W_q, W_k, memory projection
    assert 0.5 <= percent <= 2.0
