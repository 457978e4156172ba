"""HMT trained by TRL 1.16 trainers with their defaults (fused LM head, gradient checkpointing, bf16 on CPU)."""

from __future__ import annotations

import os

import peft
import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from hmt_adapter import HMTConfig
from hmt_adapter.testing import tiny_causal_lm, tiny_tokenizer
from hmt_adapter.integrations.trl import check_max_length, check_sft_args, chunk_token_ids

PATTERN = "the cat sees the dog . the king reads a book ."


def hmt_config(**overrides) -> HMTConfig:
    kwargs = dict(task_type="CAUSAL_LM", segment_length=8, num_sensory=2, recall_dim=8)
    kwargs.update(overrides)
    return HMTConfig(**kwargs)


def pattern_dataset(rows: int = 8, repeats: int = 3) -> Dataset:
    """A learnable task: a fixed phrase repeated, each document about 4 segments long."""
    return Dataset.from_dict({"text": [" ".join([PATTERN] * repeats)] * rows})


def sft_args(tmp_path, **overrides) -> SFTConfig:
    kwargs = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=3e-2,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        logging_steps=1,
        save_strategy="no",
        max_length=None,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def snapshot(model) -> dict[str, tuple[bool, torch.Tensor]]:
    return {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}


def assert_trained(model, before) -> None:
    """Every trainable parameter changed, every frozen one is bit-identical."""
    trainable = 0
    for name, param in model.named_parameters():
        was_trainable, value = before[name]
        if was_trainable:
            trainable += 1
            assert not torch.equal(value, param.detach()), f"trainable {name} did not change"
        else:
            assert torch.equal(value, param.detach()), f"frozen {name} changed"
    assert trainable > 0


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_sft_with_peft_config_trains_only_hmt(tmp_path):
    args = sft_args(tmp_path)
    assert args.gradient_checkpointing and args.bf16  # TRL's defaults on the CPU, which HMT must cope with
    trainer = SFTTrainer(
        model=tiny_causal_lm("llama"), peft_config=hmt_config(), args=args,
        train_dataset=pattern_dataset(), processing_class=tiny_tokenizer(),
    )
    assert isinstance(trainer.model, peft.PeftModel)
    before = snapshot(trainer.model)
    assert all(("hmt_" in n) == trainable for n, (trainable, _) in before.items())
    trainer.train()
    assert_trained(trainer.model, before)
    history = losses(trainer)
    assert history[-1] < history[0]
    assert all("mean_token_accuracy" in e for e in trainer.state.log_history if "loss" in e)  # fused path metrics

    trainer.save_model(str(tmp_path / "adapter"))
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not any(f.startswith("model") for f in files)  # no full-model weights
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert keys and all(".hmt_" in k for k in keys)


def test_sft_with_peft_model(tmp_path):
    model = peft.get_peft_model(tiny_causal_lm("llama"), hmt_config(use_recall=False))
    trainer = SFTTrainer(
        model=model, args=sft_args(tmp_path, max_steps=3), train_dataset=pattern_dataset(), processing_class=tiny_tokenizer()
    )
    before = snapshot(trainer.model)
    trainer.train()
    assert_trained(trainer.model, before)
    assert losses(trainer)[-1] < losses(trainer)[0]


def test_check_max_length_flags_truncated_documents():
    tokenizer = tiny_tokenizer()
    dataset = Dataset.from_dict({"text": ["the cat " * 20, "a dog"]})
    with pytest.raises(ValueError, match="max_length=None"):
        check_max_length(dataset, 16, tokenizer)
    with pytest.warns(UserWarning, match="1 of 2 documents"):
        assert check_max_length(dataset, 16, tokenizer, on_overflow="warn") == 1
    assert check_max_length(dataset, None, tokenizer) == 0
    assert check_max_length(dataset, 41, tokenizer) == 0  # 40 words + EOS fit exactly
    ids = Dataset.from_dict({"input_ids": [[5] * 30, [5] * 3]})
    assert check_max_length(ids, 10, on_overflow="ignore") == 1


def test_chunk_token_ids_keeps_every_token():
    chunks = chunk_token_ids([list(range(10)), [1]], 4)
    assert chunks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_padding_free_is_rejected_with_the_setting_to_change(tmp_path):
    with pytest.raises(ValueError, match="padding_free=False"):
        check_sft_args(sft_args(tmp_path, padding_free=True))
    with pytest.raises(ValueError, match="packing_strategy='wrapped'"):
        check_sft_args(sft_args(tmp_path, packing=True, packing_strategy="bfd"))
    with pytest.warns(UserWarning, match="document borders"):
        check_sft_args(sft_args(tmp_path, packing=True, packing_strategy="wrapped"))
    check_sft_args(sft_args(tmp_path))  # the default layout is fine
    # Without the check, TRL passes position_ids and the forward says what to set.
    trainer = SFTTrainer(
        model=tiny_causal_lm("llama"), peft_config=hmt_config(), args=sft_args(tmp_path, padding_free=True, max_steps=1),
        train_dataset=pattern_dataset(rows=2), processing_class=tiny_tokenizer(),
    )
    with pytest.raises(ValueError, match="padding_free=False"):
        trainer.train()


def test_fused_output_has_the_fields_dpo_reads():
    """Regression: TRL 1.16's DPOTrainer reads `mean_logits` from the fused head (it was None)."""
    model = peft.get_peft_model(tiny_causal_lm("llama"), hmt_config())
    model.eval()
    ids = torch.randint(4, 128, (2, 21))
    fused = model(input_ids=ids, labels=ids, fused_lm_head=True)
    logits = model(input_ids=ids).logits.float()[:, :-1]  # (B, T-1, V)
    torch.testing.assert_close(fused.mean_logits, logits.mean(-1), atol=1e-5, rtol=1e-4)
    logp = logits.log_softmax(-1)
    torch.testing.assert_close(fused.log_sum_sq_probs, (2 * logp).logsumexp(-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused.log_probs, logp.gather(2, ids[:, 1:, None]).squeeze(2), atol=1e-5, rtol=1e-4)


def test_dpo_on_prompts_longer_than_a_segment(tmp_path):
    prompt = " ".join([PATTERN] * 2)  # 24 tokens: 3 segments of 8 before the completion
    dataset = Dataset.from_dict({"prompt": [prompt] * 4, "chosen": [" yes the cat"] * 4, "rejected": [" no the dog"] * 4})
    args = DPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=3e-2, report_to="none",
        use_cpu=True, dataloader_num_workers=0, logging_steps=1, save_strategy="no", max_length=None,
    )
    trainer = DPOTrainer(
        model=tiny_causal_lm("llama"), peft_config=hmt_config(), args=args, train_dataset=dataset,
        processing_class=tiny_tokenizer(),
    )
    before = snapshot(trainer.model)
    trainer.train()
    assert_trained(trainer.model, before)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logged)
    # The reference is the backbone with the adapter disabled: its log-probs are the plain model's.
    assert logged[0]["rewards/chosen"] != 0.0
