"""User errors give a ValueError/TypeError that names what to change, and leave the model untouched."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn
from transformers import LlamaModel

import hmt_adapter  # noqa: F401
from hmt_adapter import HMTConfig
from hmt_adapter import testing as T

CFG = dict(task_type="CAUSAL_LM", segment_length=8, num_sensory=2, recall_dim=16)


def _assert_untouched(base: nn.Module, embedding: nn.Module) -> None:
    assert base.get_input_embeddings() is embedding and type(embedding) is nn.Embedding
    assert not any("hmt_" in n for n, _ in base.named_parameters())
    assert not hasattr(base, "peft_config")
    assert all(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        (dict(segment_length=0), ValueError, "segment_length"),
        (dict(segment_length=8.0), TypeError, "segment_length"),
        (dict(num_sensory=-1), ValueError, "num_sensory"),
        (dict(recall_window=0), ValueError, "recall_window"),
        (dict(recall_dim=0), ValueError, "recall_dim"),
        (dict(recall_dim=True), TypeError, "recall_dim"),
        (dict(summary_fraction=0.0), ValueError, "summary_fraction"),
        (dict(summary_fraction=1.5), ValueError, "summary_fraction"),
        (dict(summary_fraction="half"), TypeError, "summary_fraction"),
        (dict(recall_query="next"), ValueError, "recall_query"),
        (dict(loss_scope="first_segment"), ValueError, "loss_scope"),
        (dict(bptt_depth=0), ValueError, "bptt_depth"),
        (dict(bptt_depth=2.5), TypeError, "bptt_depth"),
        (dict(use_recall="yes"), TypeError, "use_recall"),
        (dict(memory_projection=1), TypeError, "memory_projection"),
        (dict(lora_r=-1), ValueError, "lora_r"),
        (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
        (dict(task_type="SEQ_CLS"), ValueError, "task_type"),
    ],
)
def test_invalid_config_values(kwargs: dict, error: type, field: str) -> None:
    with pytest.raises(error, match=field):
        HMTConfig(**kwargs)


def test_segment_exceeding_max_positions() -> None:
    base = T.tiny_causal_lm("llama", max_position_embeddings=16)
    embedding = base.get_input_embeddings()
    with pytest.raises(ValueError, match="segment_length"):
        peft.get_peft_model(base, HMTConfig(**{**CFG, "segment_length": 13}))  # 13 + 2 + 2 > 16
    _assert_untouched(base, embedding)
    peft.get_peft_model(base, HMTConfig(**{**CFG, "segment_length": 12}))  # exactly 16 positions fits


def _saved_adapter(tmp_path, model_type: str = "llama") -> str:
    peft.get_peft_model(T.tiny_causal_lm(model_type), HMTConfig(**CFG)).save_pretrained(tmp_path)
    return str(tmp_path)


def test_adapter_onto_backbone_of_another_width(tmp_path) -> None:
    path = _saved_adapter(tmp_path)  # 64-dim embeddings
    base = T.tiny_causal_lm("llama", hidden_size=32)
    embedding = base.get_input_embeddings()
    with pytest.raises(ValueError, match="64-dim.*32-dim"):
        peft.PeftModel.from_pretrained(base, path)
    _assert_untouched(base, embedding)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_adapter_weights(tmp_path, damage: str) -> None:
    path = _saved_adapter(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) - 100], "garbage": b"\x13" * len(data), "empty": b""}[damage])
    base = T.tiny_causal_lm("llama")
    embedding = base.get_input_embeddings()
    with pytest.raises(ValueError, match="adapter_model.safetensors.*(save the adapter again|re-download)"):
        peft.PeftModel.from_pretrained(base, path)
    _assert_untouched(base, embedding)


def test_adapter_weights_of_another_width_than_config(tmp_path) -> None:
    """A weights file from one adapter next to the config of another: caught before attaching."""
    path = _saved_adapter(tmp_path / "a")
    _saved_adapter(tmp_path / "b", model_type="opt-proj")  # 32-dim
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes((tmp_path / "b" / "adapter_model.safetensors").read_bytes())
    base = T.tiny_causal_lm("llama")
    embedding = base.get_input_embeddings()
    with pytest.raises(ValueError, match="base_embedding_dim=64"):
        peft.PeftModel.from_pretrained(base, path)
    _assert_untouched(base, embedding)


def test_weights_that_are_not_an_hmt_adapter(tmp_path) -> None:
    from safetensors.torch import save_file

    path = _saved_adapter(tmp_path)
    save_file({"model.embed_tokens.weight": torch.zeros(128, 64)}, str(tmp_path / "adapter_model.safetensors"))
    base = T.tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="not an HMT adapter weight"):
        peft.PeftModel.from_pretrained(base, path)
    _assert_untouched(base, base.get_input_embeddings())


@pytest.mark.parametrize("make", ["llama_model_without_head", "plain_module"])
def test_not_a_causal_lm(make: str) -> None:
    if make == "llama_model_without_head":
        model = LlamaModel(T.tiny_config("llama"))
        embedding = model.get_input_embeddings()
    else:
        model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
        embedding = model[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="causal LM"):
        peft.get_peft_model(model, HMTConfig(**CFG))
    assert not any("hmt_" in n for n, _ in model.named_parameters())
    assert not hasattr(model, "peft_config")
    if make == "llama_model_without_head":
        assert model.get_input_embeddings() is embedding
    else:
        assert model[0] is embedding
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def _model():
    return peft.get_peft_model(T.tiny_causal_lm("llama"), HMTConfig(**CFG))


def test_attention_mask_of_wrong_shape() -> None:
    model = _model()
    ids = torch.randint(4, 128, (2, 20))
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones(2, 19, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones(20, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=ids, attention_mask=torch.full((2, 20), 2))
    with pytest.raises(ValueError, match="no real tokens"):
        model(input_ids=ids, attention_mask=torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, labels=ids[:, :-1])


def test_empty_batch_and_zero_length() -> None:
    model = _model()
    with pytest.raises(ValueError, match="empty"):
        model(input_ids=torch.zeros(0, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="zero length"):
        model(input_ids=torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(input_ids=torch.zeros(20, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        model(input_ids=torch.zeros(2, 20))


def test_unsupported_forward_arguments() -> None:
    model = _model()
    ids = torch.randint(4, 128, (1, 20))
    with pytest.raises(ValueError, match="past_key_values"):
        model.base_model(input_ids=ids, past_key_values=object())
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=ids, logits_to_keep=torch.tensor([25]))
    with pytest.raises(ValueError, match="fused_lm_head"):
        model(input_ids=ids, fused_lm_head=True)
