"""The HMT adapter through PEFT's public API: attach, save, load, disable, status, unload."""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, PeftModelForCausalLM
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import hmt_adapter  # noqa: F401
from hmt_adapter import HMTConfig, HMTLayer, HMTModel
from hmt_adapter import testing as T

CFG = dict(task_type="CAUSAL_LM", segment_length=8, num_sensory=2, recall_dim=16)


def _ids(batch: int = 2, length: int = 30) -> torch.Tensor:
    return torch.randint(4, T.TINY_VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(1))


def _trained(model: PeftModelForCausalLM) -> PeftModelForCausalLM:
    """Move every HMT parameter off its init so a round trip that drops or re-inits one is caught."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hmt_" in name:
                p.add_(0.01 * torch.randn_like(p))
    return model


def test_get_peft_model_and_trainable_parameters(capsys) -> None:
    base = T.tiny_causal_lm("llama")
    model = peft.get_peft_model(base, HMTConfig(**CFG))
    assert isinstance(model, PeftModelForCausalLM) and isinstance(model.base_model, HMTModel)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("hmt_" in n for n in trainable)
    d, h = 64, 16
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == d + d + d + 2 * h * d + d * d  # m_0, s, w
    model.print_trainable_parameters()
    assert f"trainable params: {3 * d + 2 * h * d + d * d:,}" in capsys.readouterr().out


def test_save_writes_adapter_weights_only(tmp_path) -> None:
    model = peft.get_peft_model(T.tiny_causal_lm("llama"), HMTConfig(**CFG))
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    # PEFT always adds its model card README.md; there is no other weight or config file
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files <= {
        "adapter_config.json", "adapter_model.safetensors", "README.md"}
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    expected = {f"base_model.model.model.embed_tokens.{n}" for n in (
        "hmt_memory_init", "hmt_summary_token", "hmt_write_token", "hmt_recall_q.weight", "hmt_recall_k.weight",
        "hmt_memory_proj.weight")}
    assert keys == expected
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "HMT"


def test_round_trip_peft_model_from_pretrained_bit_identical(tmp_path) -> None:
    model = _trained(peft.get_peft_model(T.tiny_causal_lm("llama"), HMTConfig(**CFG))).eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(T.tiny_causal_lm("llama"), str(tmp_path)).eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default
    trainable = PeftModel.from_pretrained(T.tiny_causal_lm("llama"), str(tmp_path), is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if "hmt_" in n}


def test_round_trip_auto_peft_model_with_local_base(tmp_path) -> None:
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    T.tiny_causal_lm("llama").save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)  # records base_dir as name_or_path
    model = _trained(peft.get_peft_model(base, HMTConfig(**CFG))).eval()
    model.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir)).eval()
    assert isinstance(loaded.base_model, HMTModel)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_disable_adapter_gives_the_base_model() -> None:
    reference = T.tiny_causal_lm("llama").eval()
    model = peft.get_peft_model(T.tiny_causal_lm("llama"), HMTConfig(**CFG)).eval()
    ids = _ids()
    with torch.no_grad():
        base_out = reference(input_ids=ids, labels=ids)
        with_hmt = model(input_ids=ids).logits
        assert model.base_model.hmt_enabled()
        with model.disable_adapter():
            assert not model.base_model.hmt_enabled()
            out = model(input_ids=ids, labels=ids)
        after = model(input_ids=ids).logits
    assert model.base_model.hmt_enabled()
    assert torch.equal(out.logits, base_out.logits) and torch.equal(out.loss, base_out.loss)
    assert not torch.allclose(with_hmt, base_out.logits)  # the adapter does change the model
    assert torch.equal(after, with_hmt)  # and is back on after the context


def test_get_model_status_and_layer_status() -> None:
    model = peft.get_peft_model(T.tiny_causal_lm("llama"), HMTConfig(**CFG))
    status = model.get_model_status()
    assert status.peft_types == {"default": "HMT"} and status.num_adapter_layers == 1 and status.enabled
    assert status.trainable_params == sum(p.numel() for n, p in model.named_parameters() if "hmt_" in n)
    layers = model.get_layer_status()
    assert len(layers) == 1 and layers[0].module_type == "hmt.HMTLayer"


def test_merge_and_unload_raises_and_unload_restores_embedding() -> None:
    base = T.tiny_causal_lm("llama")
    embedding = base.get_input_embeddings()
    model = peft.get_peft_model(base, HMTConfig(**CFG))
    assert isinstance(model.get_base_model().get_input_embeddings(), HMTLayer)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    plain = model.unload()
    assert plain.get_input_embeddings() is embedding and type(embedding) is nn.Embedding
    assert not any("hmt_" in n for n, _ in plain.named_parameters())
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, T.tiny_causal_lm("llama")(input_ids=ids).logits)


def test_hmt_with_lora_round_trip(tmp_path) -> None:
    """HMT + LoRA in one artifact passes the load-time weights check and round-trips bit-identically."""
    model = _trained(peft.get_peft_model(T.tiny_causal_lm("llama"), HMTConfig(**CFG, lora_r=2))).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("hmt_" in n for n in trainable)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.01 * torch.randn_like(p))  # lora_B starts at zero
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys and all(("hmt_" in k or "lora_" in k) for k in keys) and any("lora_" in k for k in keys)
    loaded = PeftModel.from_pretrained(T.tiny_causal_lm("llama"), str(tmp_path)).eval()
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)



@pytest.mark.parametrize("lora_r", [0, 2])
def test_reload_onto_tied_embeddings_raises_no_peft_warning(tmp_path, lora_r: int) -> None:
    """HMT never changes the (tied) embedding weights: PEFT's "no implementation exists to tie" warning must not
    fire."""
    def tied():
        return T.tiny_causal_lm("llama", tie_word_embeddings=True)

    peft.get_peft_model(tied(), HMTConfig(**CFG, lora_r=lora_r)).save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tied(), str(tmp_path))
        loaded.load_adapter(str(tmp_path), "second")
    from_peft = [w for w in caught if "tie" in str(w.message) or (issubclass(w.category, UserWarning)
                                                                   and "peft" in w.filename.split(os.sep))]
    assert not from_peft, [str(w.message)[:200] for w in from_peft]
    model = loaded.get_base_model()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().base_layer.weight  # still tied


@pytest.mark.parametrize("overrides", [dict(write_token="learned"), dict(memory_gate=True), dict(recall_scale="log_n"), dict(recall_null=True), dict(use_recall=False),
                                       dict(memory_projection=False), dict(lora_r=2, lora_target_modules=["q_proj"])])
def test_every_config_variant_reloads_with_exactly_its_keys(tmp_path, overrides: dict) -> None:
    """The load-time key check (HMTLayer/HMTLoraLinear.saved_param_names) agrees with what save_pretrained writes."""
    model = _trained(peft.get_peft_model(T.tiny_causal_lm("llama"), HMTConfig(**{**CFG, **overrides}))).eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(T.tiny_causal_lm("llama"), str(tmp_path)).eval()
    assert loaded.peft_config["default"].saved_weight_keys == set(load_file(tmp_path / "adapter_model.safetensors"))
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
