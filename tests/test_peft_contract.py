"""The PEFT contract, checked on HMT and HMT + LoRA over tiny Llama, OPT and GPT-2 with several-segment inputs.

What PEFT's shared test suite checks for every method (save/load, config from pretrained, several adapters,
unload, disable, training with gradient checkpointing, device_map, inputs_embeds, status), through the public API
only. Adapter operations that are specific to merging (merge, weighted combination, LoRA conversion) are refused
by HMT (tests/test_peft_ops.py).
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from hmt_adapter import HMTConfig
from hmt_adapter.testing import tiny_causal_lm

BACKBONES = ["llama", "opt", "gpt2"]
IDS = torch.randint(4, 128, (2, 30), generator=torch.Generator().manual_seed(1))  # 4 segments of 8


def make_config(lora: bool, **overrides) -> HMTConfig:
    kwargs = dict(segment_length=8, num_sensory=2, recall_dim=8)
    if lora:
        kwargs.update(lora_r=2, lora_alpha=4)
    kwargs.update(overrides)
    return HMTConfig(**kwargs)


def base(kind: str) -> torch.nn.Module:
    return tiny_causal_lm(kind, seed=0).eval()


def trained(kind: str, lora: bool, **overrides):
    """An HMT model whose adapter weights are away from their init (LoRA B is zero at init)."""
    model = peft.get_peft_model(base(kind), make_config(lora, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".hmt_" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def logits(model, **inputs) -> torch.Tensor:
    inputs = inputs or {"input_ids": IDS}
    with torch.no_grad():
        return model(**inputs).logits


CASES = [(kind, lora) for kind in BACKBONES for lora in (False, True)]
IDS_CASES = [f"{kind}-{'lora' if lora else 'hmt'}" for kind, lora in CASES]
pytestmark = pytest.mark.parametrize(("kind", "lora"), CASES, ids=IDS_CASES)


@pytest.mark.parametrize("safe", [True, False])
def test_save_load_round_trip(tmp_path, kind, lora, safe) -> None:
    model = trained(kind, lora)
    expected = logits(model)
    model.save_pretrained(tmp_path, safe_serialization=safe)
    weights = tmp_path / ("adapter_model.safetensors" if safe else "adapter_model.bin")
    assert weights.is_file()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "HMT"
    state = peft.get_peft_model_state_dict(model)
    assert state and all(".hmt_" in k for k in state)
    assert any(".hmt_lora_A." in k for k in state) == lora
    reloaded = peft.PeftModel.from_pretrained(base(kind), tmp_path)
    assert torch.equal(logits(reloaded), expected)


def test_config_from_pretrained(tmp_path, kind, lora) -> None:
    model = trained(kind, lora, recall_query="previous")
    model.save_pretrained(tmp_path)
    expected = dict(model.peft_config["default"].to_dict(), inference_mode=True)  # PEFT saves inference_mode=True
    for loaded in (HMTConfig.from_pretrained(tmp_path), peft.PeftConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded, HMTConfig)
        assert loaded.to_dict() == expected


def test_two_adapters_set_save_selected_and_delete(tmp_path, kind, lora) -> None:
    model = trained(kind, lora)
    first = logits(model)
    model.add_adapter("second", make_config(lora, num_sensory=1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".second" in name:
                p.add_(0.05 * torch.randn_like(p))
    assert torch.equal(logits(model), first)  # adding does not switch
    model.set_adapter("second")
    second = logits(model)
    assert not torch.allclose(second, first)
    model.set_adapter("default")
    assert torch.equal(logits(model), first)

    model.save_pretrained(tmp_path, selected_adapters=["second"])
    assert not (tmp_path / "adapter_config.json").exists() and (tmp_path / "second" / "adapter_config.json").exists()
    reloaded = peft.PeftModel.from_pretrained(base(kind), tmp_path / "second")
    assert torch.equal(logits(reloaded), second)

    model.delete_adapter("second")  # inactive
    assert not [n for n, _ in model.named_parameters() if ".second" in n]
    assert torch.equal(logits(model), first)


def test_unload_and_disable_give_the_base(kind, lora) -> None:
    reference = logits(base(kind))
    model = trained(kind, lora)
    assert not torch.allclose(logits(model), reference)
    with model.disable_adapter():
        assert torch.equal(logits(model), reference)
    assert not torch.allclose(logits(model), reference)
    unloaded = model.unload()
    assert not any(".hmt_" in n for n, _ in unloaded.named_parameters())
    assert torch.equal(logits(unloaded), reference)


@pytest.mark.parametrize("reentrant", [None, True, False])
def test_training_reaches_every_adapter_parameter_only(kind, lora, reentrant) -> None:
    model = trained(kind, lora)
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".hmt_" in n for n in trainable)
    model(input_ids=IDS, labels=IDS).loss.backward()
    missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"
    torch.optim.SGD(trainable.values(), lr=0.1).step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_device_map_loading_and_inputs_embeds(tmp_path, kind, lora) -> None:
    model = trained(kind, lora)
    expected = logits(model)
    model.save_pretrained(tmp_path / "adapter")
    base(kind).save_pretrained(tmp_path / "base")
    backbone = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu")
    reloaded = peft.PeftModel.from_pretrained(backbone, tmp_path / "adapter").eval()
    assert torch.equal(logits(reloaded), expected)
    embeds = reloaded.get_input_embeddings()(IDS)
    torch.testing.assert_close(logits(reloaded, inputs_embeds=embeds), expected)


def test_low_cpu_mem_usage_and_trainability_on_load(tmp_path, kind, lora) -> None:
    model = trained(kind, lora)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    fast = peft.PeftModel.from_pretrained(base(kind), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in fast.parameters())
    assert torch.equal(logits(fast), expected)
    assert not any(p.requires_grad for p in fast.parameters())  # is_trainable=False by default
    fast.load_adapter(tmp_path, adapter_name="trainable", is_trainable=True)
    names = {n for n, p in fast.named_parameters() if p.requires_grad}
    assert names and all(".trainable" in n for n in names) and any(".hmt_lora_" in n for n in names) == lora


def test_status_reports_hmt(kind, lora) -> None:
    model = trained(kind, lora)
    status = model.get_model_status()
    assert status.peft_types == {"default": "HMT"} and status.enabled is True
    assert status.active_adapters == ["default"] and status.requires_grad == {"default": True}
    layers = model.get_layer_status()
    assert layers and all(row.module_type.startswith("hmt.") for row in layers)
    assert sum(row.module_type == "hmt.HMTLoraLinear" for row in layers) > 0 if lora else len(layers) == 1
