"""A 4-bit (nf4) backbone through bitsandbytes on the CPU: attach, train a step, round trip."""

from __future__ import annotations

import importlib.util

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import hmt_adapter  # noqa: F401
from hmt_adapter import HMTConfig
from hmt_adapter import testing as T

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed (pip install hmt-adapter[quant])"
)


def _load_4bit(path) -> torch.nn.Module:
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu")


def test_nf4_backbone_trains_and_round_trips(tmp_path) -> None:
    import bitsandbytes as bnb

    T.tiny_causal_lm("llama").save_pretrained(tmp_path / "base")
    base = _load_4bit(tmp_path / "base")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = peft.get_peft_model(base, HMTConfig(task_type="CAUSAL_LM", segment_length=8, num_sensory=2, recall_dim=16))
    hmt = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert hmt and all("hmt_" in n and p.dtype == torch.float32 for n, p in hmt.items())
    before = {n: p.detach().clone() for n, p in hmt.items()}

    ids = torch.randint(4, T.TINY_VOCAB_SIZE, (2, 29), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    torch.optim.AdamW(hmt.values(), lr=1e-2).step()
    assert all(not torch.equal(p, before[n]) for n, p in hmt.items())
    for name, p in model.get_base_model().named_parameters():
        if "hmt_" not in name:
            assert torch.equal(p, frozen[name.replace(".base_layer.", ".")]), name

    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(_load_4bit(tmp_path / "base"), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
