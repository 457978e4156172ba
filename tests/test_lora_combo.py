"""HMT + LoRA in one adapter: both train, both are saved in one file, PEFT reloads them bit-identically."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file
from trl import SFTTrainer

from hmt_adapter import HMTConfig
from hmt_adapter.testing import tiny_causal_lm, tiny_tokenizer
from test_trl import assert_trained, pattern_dataset, sft_args, snapshot


def combo_config(**overrides) -> HMTConfig:
    kwargs = dict(task_type="CAUSAL_LM", segment_length=8, num_sensory=2, recall_dim=8, lora_r=2, lora_alpha=4)
    kwargs.update(overrides)
    return HMTConfig(**kwargs)


def test_sft_trains_lora_and_hmt_and_reloads_identically(tmp_path):
    trainer = SFTTrainer(
        model=tiny_causal_lm("llama"), peft_config=combo_config(), args=sft_args(tmp_path, max_steps=3, bf16=False),
        train_dataset=pattern_dataset(rows=6), processing_class=tiny_tokenizer(),
    )
    before = snapshot(trainer.model)
    trainable = {n for n, (t, _) in before.items() if t}
    assert any("lora_" in n for n in trainable) and any("hmt_" in n for n in trainable)
    assert all("lora_" in n or "hmt_" in n for n in trainable)
    trainer.train()
    assert_trained(trainer.model, before)  # LoRA B starts at zero, so "changed" means it got gradient

    trainer.save_model(str(tmp_path / "adapter"))
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any(".hmt_lora_A." in k for k in keys) and any(".hmt_memory_init" in k for k in keys)
    assert all(".hmt_" in k for k in keys)  # LoRA weights carry the prefix too (hmt_lora_A/B)

    # bf16=False: under bf16, accelerate wraps the trained model's forward in autocast for good, so its logits
    # would not be comparable with a freshly loaded float32 model's.
    model = trainer.model.eval()
    ids = torch.randint(4, 128, (2, 21))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    reloaded = peft.PeftModel.from_pretrained(tiny_causal_lm("llama"), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
    with torch.no_grad(), reloaded.disable_adapter():  # LoRA is disabled along with HMT
        assert torch.equal(reloaded(input_ids=ids).logits, tiny_causal_lm("llama").eval()(input_ids=ids).logits)


def test_hmt_lora_on_a_4bit_backbone_round_trip(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_causal_lm("llama").save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)

    def load_base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, dtype=torch.float32)

    model = peft.get_peft_model(load_base(), combo_config())
    before = snapshot(model)
    ids = torch.randint(4, 128, (2, 20))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids, labels=ids, fused_lm_head=True).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_trained(model, before)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(load_base(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)
