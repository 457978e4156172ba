"""The paper's "0.5-2% extra parameters" with default settings, on real configs built on the meta device, and the
README's formula for the adapter's size, checked against the parameters that exist for every switch that changes it."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import hmt_adapter  # noqa: F401
from hmt_adapter import HMTConfig
from hmt_adapter.tuner.lora import HMTLoraLinear
from hmt_adapter.testing import tiny_causal_lm
import fixtures


def readme_formula(d: int, config: HMTConfig) -> int:
    """README.md: d (m_0) + d + 2·h·d (s, W_q, W_k; none with use_recall=False) + d² (memory_projection=True)
    + d (w, write_token="learned") + 1 (g, memory_gate=True) + d (n, recall_null=True), plus r·(in + out) per LoRA-wrapped linear layer."""
    count = d
    if config.use_recall:
        count += d + 2 * config.recall_dim * d
    if config.memory_projection:
        count += d * d
    if config.write_token == "learned":
        count += d
    if config.memory_gate:
        count += 1
    if config.recall_null:
        count += d
    return count


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
    assert hmt == 3 * width + 2 * h * width + width * width  # m_0, s, w (learned write token), W_q, W_k, projection
    assert 0.5 <= percent <= 2.0


@pytest.mark.parametrize("use_recall", [True, False])
@pytest.mark.parametrize("memory_projection", [True, False])
@pytest.mark.parametrize("write_token", ["memory", "learned"])
@pytest.mark.parametrize("lora_r", [0, 2])
def test_readme_formula_counts_every_trainable_parameter(use_recall, memory_projection, write_token, lora_r) -> None:
    config = HMTConfig(segment_length=8, num_sensory=2, recall_dim=24, use_recall=use_recall,
                       memory_projection=memory_projection, write_token=write_token, lora_r=lora_r,
                       memory_gate=use_recall and write_token == "learned", recall_null=use_recall and lora_r > 0)
    model = peft.get_peft_model(tiny_causal_lm("llama"), config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = [m for m in model.modules() if isinstance(m, HMTLoraLinear)]
    assert bool(lora) == (lora_r > 0)
    in_out = sum(m.base_layer.in_features + m.base_layer.out_features for m in lora)
    assert trainable == readme_formula(64, config) + lora_r * in_out
