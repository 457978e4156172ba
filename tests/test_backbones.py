"""Every supported backbone family: attach, long forward, backward, one optimizer step, save/load round trip."""

from __future__ import annotations

import peft
import pytest
import torch

import hmt_adapter  # noqa: F401
from hmt_adapter import HMTConfig
from hmt_adapter import testing as T


@pytest.mark.parametrize("model_type", T.SUPPORTED_TINY_MODEL_TYPES)
def test_backbone_train_step_and_round_trip(model_type: str, tmp_path) -> None:
    base = T.tiny_causal_lm(model_type)
    frozen_before = {n: p.detach().clone() for n, p in base.named_parameters()}
    config = HMTConfig(task_type="CAUSAL_LM", segment_length=8, num_sensory=2, recall_dim=16)
    model = peft.get_peft_model(base, config)
    d = base.get_input_embeddings().weight.shape[1]
    assert model.peft_config["default"].base_embedding_dim == d
    hmt = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert hmt and all("hmt_" in n for n in hmt)
    hmt_before = {n: p.detach().clone() for n, p in hmt.items()}

    ids = torch.randint(4, T.TINY_VOCAB_SIZE, (2, 29), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids)  # 4 segments, the last one partial
    assert out.logits.shape == (2, 29, T.TINY_VOCAB_SIZE) and torch.isfinite(out.loss)
    out.loss.backward()
    torch.optim.AdamW(hmt.values(), lr=1e-2, weight_decay=0.0).step()

    for name, p in hmt.items():
        assert not torch.equal(p, hmt_before[name]), f"{name} did not change"
    for name, p in model.get_base_model().named_parameters():
        if "hmt_" not in name:
            original = name.replace(".base_layer.", ".")
            assert torch.equal(p, frozen_before[original]), f"backbone parameter {name} changed"

    model.eval()
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(T.tiny_causal_lm(model_type), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
