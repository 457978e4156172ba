"""User errors give a ValueError/TypeError that names what to change, and leave the model untouched."""

from __future__ import annotations

import re

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
        (dict(recall_scale="log"), ValueError, "recall_scale"),
        (dict(recall_sharpen_beyond=1), ValueError, "recall_sharpen_beyond"),
        (dict(recall_sharpen_beyond=-2), ValueError, "recall_sharpen_beyond"),
        (dict(recall_sharpen_beyond=16.0), TypeError, "recall_sharpen_beyond"),
        (dict(recall_sharpen_beyond=16, recall_scale="log_n"), ValueError, "recall_sharpen_beyond"),
        (dict(recall_sharpen_beyond=16, use_recall=False), ValueError, "recall_sharpen_beyond"),
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


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("how", ["from_pretrained", "config_without_weight_keys", "load_adapter", "auto"])
def test_adapter_onto_another_architecture_of_the_same_width(tmp_path, how: str) -> None:
    """Saved on a Llama, loaded onto a GPT-2, both 64 wide: PEFT alone only warns and runs untrained HMT weights."""
    path = _saved_adapter(tmp_path / "adapter")
    names = "saved for LlamaForCausalLM.* but is being loaded onto GPT2LMHeadModel"
    if how == "auto":
        T.tiny_causal_lm("gpt2").save_pretrained(tmp_path / "gpt2")
        config_file = tmp_path / "adapter" / "adapter_config.json"
        config_file.write_text(config_file.read_text().replace('"base_model_name_or_path": null',
                                                               f'"base_model_name_or_path": "{tmp_path / "gpt2"}"'))
        with pytest.raises(ValueError, match=names + ".*'model.embed_tokens' have no module here"):
            peft.AutoPeftModelForCausalLM.from_pretrained(path)
        return
    base = T.tiny_causal_lm("gpt2")
    embedding = base.get_input_embeddings()
    if how == "load_adapter":  # onto a model that already carries an adapter: that one is left as it was
        model = peft.get_peft_model(base, HMTConfig(**CFG)).eval()
        ids = torch.randint(4, 128, (1, 20))
        before = _logits(model, ids)
        with pytest.raises(ValueError, match=names):
            model.load_adapter(path, "other")
        assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
        assert not any(".other" in n for n, _ in model.named_parameters())
        assert torch.equal(_logits(model, ids), before)
        return
    # a config read by PEFT's base class does not carry the weights' keys: its saved target_modules are compared
    config = peft.PeftConfig.from_pretrained(path) if how == "config_without_weight_keys" else None
    with pytest.raises(ValueError, match=names + ".*'transformer.wte' would keep untrained weights"):
        peft.PeftModel.from_pretrained(base, path, config=config)
    _assert_untouched(base, embedding)


@pytest.mark.parametrize("weight_keys", [True, False])
def test_lora_adapter_onto_a_deeper_backbone(tmp_path, weight_keys: bool) -> None:
    """Same class and width, one layer more: that layer's LoRA would stay untrained."""
    peft.get_peft_model(T.tiny_causal_lm("llama"), HMTConfig(**CFG, lora_r=2)).save_pretrained(tmp_path)
    base = T.tiny_causal_lm("llama", num_hidden_layers=3)
    config = None if weight_keys else peft.PeftConfig.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*'model.layers.2.mlp.down_proj'.* and 4 more would keep"):
        peft.PeftModel.from_pretrained(base, str(tmp_path), config=config)
    _assert_untouched(base, base.get_input_embeddings())


def test_adapter_without_a_recorded_class_still_loads_where_it_fits(tmp_path) -> None:
    """Adapters saved before the backbone class was recorded load onto a matching backbone, and name what they can."""
    model = peft.get_peft_model(T.tiny_causal_lm("llama"), HMTConfig(**CFG)).eval()
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    text = config_file.read_text()
    assert '"base_model_class": "LlamaForCausalLM"' in text
    config_file.write_text(re.sub(r'"auto_mapping": \{[^}]*\}', '"auto_mapping": null', text))
    ids = torch.randint(4, 128, (1, 20))
    assert torch.equal(_logits(peft.PeftModel.from_pretrained(T.tiny_causal_lm("llama"), str(tmp_path)), ids),
                       _logits(model, ids))
    with pytest.raises(ValueError, match="saved for a backbone whose class was not recorded but is being loaded onto "
                                         "GPT2LMHeadModel"):
        peft.PeftModel.from_pretrained(T.tiny_causal_lm("gpt2"), str(tmp_path))


def test_config_edited_away_from_its_weights(tmp_path) -> None:
    path = _saved_adapter(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(config_file.read_text().replace('"write_token": "learned"', '"write_token": "memory"'))
    base = T.tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="do not belong together.*hmt_write_token"):
        peft.PeftModel.from_pretrained(base, path)
    _assert_untouched(base, base.get_input_embeddings())
