"""Regression tests for PEFT adapter operations on HMT and HMT + LoRA (one adapter in every operation).

Each test pins one failure of hmt-adapter 0.1.0: a config without task_type ran the bare backbone; a second
HMT + LoRA adapter was stored as a LoraConfig; loading a frozen reference adapter froze the trained one;
`is_trainable=False` left LoRA trainable; delete_adapter left LoRA weights behind and deleting the last adapter
broke the model; LoRA parameters lacked the tuner prefix; low_cpu_mem_usage / autocast_adapter_dtype were ignored.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch

from hmt_adapter import HMTConfig
from hmt_adapter.testing import tiny_causal_lm

IDS = torch.randint(4, 128, (2, 27), generator=torch.Generator().manual_seed(0))  # 4 segments of 8


def config(lora: bool, **overrides) -> HMTConfig:
    kwargs = dict(segment_length=8, num_sensory=2, recall_dim=8, task_type="CAUSAL_LM")
    if lora:
        kwargs.update(lora_r=2, lora_alpha=4)
    kwargs.update(overrides)
    return HMTConfig(**kwargs)


def perturb(model, adapter: str = "default", scale: float = 0.05) -> None:
    """Move every parameter of one adapter away from its init (LoRA B starts at zero)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{adapter}" in name and ".hmt_" in name:
                p.add_(scale * torch.randn_like(p))


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapter_params(model, adapter: str) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith(f".{adapter}") or f".{adapter}." in n}


@pytest.fixture
def base():
    return tiny_causal_lm("llama").eval()


def test_task_type_omitted_still_runs_hmt(base) -> None:
    reference = logits(tiny_causal_lm("llama").eval())
    model = peft.get_peft_model(base, HMTConfig(segment_length=8, num_sensory=2, recall_dim=8))
    assert isinstance(model, peft.PeftModelForCausalLM)
    assert not torch.allclose(logits(model), reference)  # m_0 and s change every segment pass
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_task_type_other_than_causal_lm_is_refused() -> None:
    with pytest.raises(ValueError, match="task_type"):
        HMTConfig(task_type="SEQ_CLS")


@pytest.mark.parametrize("lora", [False, True])
def test_every_trainable_parameter_carries_the_prefix(base, lora) -> None:
    model = peft.get_peft_model(base, config(lora))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".hmt_" in n for n in trainable)
    assert any(".hmt_lora_A." in n for n in trainable) == lora


@pytest.mark.parametrize("lora", [False, True])
def test_second_adapter_is_hmt_in_memory_on_disk_and_in_status(base, tmp_path, lora) -> None:
    model = peft.get_peft_model(base, config(lora))
    model.add_adapter("other", config(lora, num_sensory=1))
    perturb(model, "other")
    assert type(model.peft_config["other"]) is HMTConfig
    model.set_adapter("other")
    out_other = logits(model)
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    saved = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "HMT" and saved["num_sensory"] == 1
    assert model.get_model_status().peft_types == {"default": "HMT", "other": "HMT"}
    types = {row.module_type for row in model.get_layer_status()}
    assert types == ({"hmt.HMTLayer", "hmt.HMTLoraLinear"} if lora else {"hmt.HMTLayer"})
    reloaded = peft.PeftModel.from_pretrained(tiny_causal_lm("llama").eval(), tmp_path / "other")
    assert torch.equal(logits(reloaded), out_other)


@pytest.mark.parametrize("lora", [False, True])
def test_loading_a_frozen_reference_keeps_the_trained_adapter_trainable(base, tmp_path, lora) -> None:
    peft.get_peft_model(tiny_causal_lm("llama"), config(lora)).save_pretrained(tmp_path)
    model = peft.get_peft_model(base, config(lora))
    model.load_adapter(tmp_path, adapter_name="ref", is_trainable=False)
    trained, ref = adapter_params(model, "default"), adapter_params(model, "ref")
    assert trained and all(p.requires_grad for p in trained.values())
    assert ref and not any(p.requires_grad for p in ref.values())
    assert any(".hmt_lora_A." in n for n in ref) == lora


@pytest.mark.parametrize("lora", [False, True])
def test_is_trainable_false_freezes_every_adapter_parameter(tmp_path, lora) -> None:
    peft.get_peft_model(tiny_causal_lm("llama"), config(lora)).save_pretrained(tmp_path)
    frozen = peft.PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path, is_trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = peft.PeftModel.from_pretrained(tiny_causal_lm("llama"), tmp_path, is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all(".hmt_" in n for n in names) and any(".hmt_lora_" in n for n in names) == lora


@pytest.mark.parametrize("active", [False, True])
def test_delete_adapter_removes_its_lora_weights_too(base, active) -> None:
    model = peft.get_peft_model(base, config(True))
    model.add_adapter("other", config(True))
    perturb(model, "default")
    expected_default = logits(model)
    victim = "default" if active else "other"
    if active:
        model.set_adapter("default")
    model.delete_adapter(victim)
    assert not adapter_params(model, victim)
    assert victim not in model.peft_config
    if not active:
        assert torch.equal(logits(model), expected_default)


@pytest.mark.parametrize("lora", [False, True])
def test_deleting_the_last_adapter_gives_the_bare_backbone(base, lora) -> None:
    reference = logits(tiny_causal_lm("llama").eval())
    model = peft.get_peft_model(base, config(lora))
    perturb(model)
    model.delete_adapter("default")
    assert not adapter_params(model, "default") and not model.base_model.hmt_enabled()
    # PeftModel's own forward looks up the deleted adapter's config (for PEFT's LoRA as well); the tuner it wraps,
    # like PEFT's LoraModel, now runs the bare backbone.
    assert torch.equal(logits(model.base_model), reference)


@pytest.mark.parametrize("lora", [False, True])
def test_low_cpu_mem_usage_creates_on_meta_then_loads(tmp_path, lora) -> None:
    trained = peft.get_peft_model(tiny_causal_lm("llama").eval(), config(lora))
    perturb(trained)
    trained.save_pretrained(tmp_path)
    expected = logits(trained)

    on_meta = peft.get_peft_model(tiny_causal_lm("llama"), config(lora), low_cpu_mem_usage=True)
    params = [p for n, p in on_meta.named_parameters() if ".hmt_" in n]
    assert params and all(p.device.type == "meta" for p in params)

    loaded = peft.PeftModel.from_pretrained(tiny_causal_lm("llama").eval(), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    assert torch.equal(logits(loaded), expected)


@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype_is_honoured(autocast) -> None:
    backbone = tiny_causal_lm("llama").to(torch.bfloat16)
    model = peft.get_peft_model(backbone, config(True), autocast_adapter_dtype=autocast)
    dtypes = {p.dtype for n, p in model.named_parameters() if ".hmt_" in n}
    assert dtypes == ({torch.float32} if autocast else {torch.bfloat16})
    out = model(input_ids=IDS[:, :20]).logits
    assert torch.isfinite(out.float()).all()


def test_merging_and_weighted_combination_are_refused(base) -> None:
    model = peft.get_peft_model(base, config(True))
    with pytest.raises(ValueError, match="merged"):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="weighting"):
        model.add_weighted_adapter(["default"], [1.0], "mix")
