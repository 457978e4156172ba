"""Tests for the tiny model / tokenizer factories in hmt_adapter.testing."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fixtures
from hmt_adapter import testing as T


def _batch(vocab_size: int = T.TINY_VOCAB_SIZE, batch: int = 2, seq: int = 12):
    input_ids = torch.randint(4, vocab_size, (batch, seq))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, seq - 3 :] = 0  # right padding on the second row
    input_ids[1, seq - 3 :] = T.PAD_TOKEN_ID
    return input_ids, attention_mask


@pytest.mark.parametrize("model_type", T.SUPPORTED_TINY_MODEL_TYPES)
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_tiny_models_forward(model_type: str, attn_implementation: str) -> None:
    if model_type == "gemma2" and attn_implementation == "sdpa":
        pytest.skip("transformers has no sdpa attention for Gemma-2 (its tiny model defaults to eager)")
    model = T.tiny_causal_lm(model_type, attn_implementation=attn_implementation)
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == attn_implementation
    assert model.config.vocab_size == T.TINY_VOCAB_SIZE
    assert model.config.pad_token_id == T.PAD_TOKEN_ID
    assert model.config.eos_token_id == T.EOS_TOKEN_ID
    input_ids, attention_mask = _batch()
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    assert out.logits.shape == (2, 12, T.TINY_VOCAB_SIZE)
    assert torch.isfinite(out.logits).all()
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("model_type", T.SUPPORTED_TINY_MODEL_TYPES)
def test_tiny_models_are_deterministic(model_type: str) -> None:
    a = T.tiny_causal_lm(model_type, seed=3)
    b = T.tiny_causal_lm(model_type, seed=3)
    c = T.tiny_causal_lm(model_type, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    # from_config leaves the model in train mode; dropouts are 0 so forward is deterministic.
    assert a.training
    input_ids, attention_mask = _batch()
    with torch.no_grad():
        l1 = a(input_ids=input_ids, attention_mask=attention_mask).logits
        l2 = a(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)


def test_tiny_config_shapes() -> None:
    llama = T.tiny_config("llama")
    assert (llama.hidden_size, llama.num_hidden_layers, llama.num_attention_heads) == (64, 2, 4)
    assert llama.num_key_value_heads == 2
    assert llama.intermediate_size == 128 and llama.max_position_embeddings == 512
    for gqa in ("qwen2", "mistral"):
        assert T.tiny_config(gqa).num_key_value_heads == 2
    gpt2 = T.tiny_config("gpt2")
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head, gpt2.n_positions) == (64, 2, 4, 512)
    opt = T.tiny_config("opt")
    assert opt.enable_bias and opt.do_layer_norm_before and opt.word_embed_proj_dim == 64
    assert T.tiny_config("llama", vocab_size=256, num_hidden_layers=3).vocab_size == 256
    with pytest.raises(ValueError):
        T.tiny_config("bert")


def test_opt_proj_has_projections() -> None:
    model = T.tiny_causal_lm("opt-proj")
    cfg = model.config
    assert cfg.word_embed_proj_dim == 32 and cfg.hidden_size == 64
    assert cfg.do_layer_norm_before is False
    decoder = model.model.decoder
    assert decoder.project_in is not None and decoder.project_out is not None
    assert decoder.embed_tokens.weight.shape == (T.TINY_VOCAB_SIZE, 32)
    assert decoder.final_layer_norm is None
    # the plain tiny OPT has neither projection
    plain = T.tiny_causal_lm("opt").model.decoder
    assert plain.project_in is None and plain.project_out is None


def test_tokenizer_basics(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    assert len(tok) == T.TINY_VOCAB_SIZE
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "right"
    ids = tok("The cat sees a zebra.")["input_ids"]
    assert ids[-2] == tok.unk_token_id and ids[-1] == tok.convert_tokens_to_ids(".")
    assert tok.decode(tok("the cat sees a dog")["input_ids"]) == "the cat sees a dog"
    assert T.tiny_tokenizer(padding_side="left").padding_side == "left"
    custom = T.tiny_tokenizer(["hello", "world", "hello"])
    assert len(custom) == 6 and custom("hello world")["input_ids"] == [4, 5]


def test_tokenizer_pads_for_model(tiny_tokenizer, tiny_llama) -> None:
    enc = tiny_tokenizer(["the cat", "a dog runs fast ."], padding=True, return_tensors="pt")
    assert enc["input_ids"][0, -1].item() == T.PAD_TOKEN_ID
    out = tiny_llama(**enc)
    assert out.logits.shape == (2, enc["input_ids"].shape[1], T.TINY_VOCAB_SIZE)


def test_tokenizer_round_trip(tmp_path, tiny_tokenizer) -> None:
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == tiny_tokenizer.get_vocab()
    assert loaded.pad_token == "<pad>" and loaded.eos_token == "</s>"
    assert loaded.bos_token == "<s>" and loaded.unk_token == "<unk>"
    assert loaded.padding_side == "right"
    assert loaded.chat_template == tiny_tokenizer.chat_template
    text = "the old king remembers the river , 3 days ."
    assert loaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]


def test_chat_template(tiny_tokenizer) -> None:
    messages = [
        {"role": "user", "content": "where is the cat ?"},
        {"role": "assistant", "content": "the cat is in the house ."},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "user: where is the cat ?\nassistant: the cat is in the house . </s>\n"
    prompt = tiny_tokenizer.apply_chat_template(
        messages[:1], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("assistant: ")
    enc = tiny_tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    mask = enc["assistant_masks"]
    assert sum(mask) == len(tiny_tokenizer("the cat is in the house . </s>")["input_ids"])
    assert enc["input_ids"][-1] == T.EOS_TOKEN_ID and mask[-1] == 1


@pytest.mark.parametrize("name", fixtures.REAL_CONFIG_NAMES)
def test_real_config_param_counts(name: str) -> None:
    expected = {
        "facebook/opt-350m": 331e6,
        "facebook/opt-2.7b": 2.65e9,
        "meta-llama/Llama-2-7b-hf": 6.74e9,
        "HuggingFaceTB/SmolLM-135M": 134.5e6,
    }[name]
    cfg = fixtures.real_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - expected) / expected < 0.02, n
    assert n == fixtures.REAL_PARAM_COUNTS[name]


def test_real_config_details() -> None:
    opt350 = fixtures.real_config("facebook/opt-350m")
    assert opt350.word_embed_proj_dim == 512 and opt350.hidden_size == 1024
    assert opt350.do_layer_norm_before is False
    assert fixtures.real_config("opt-2.7b").word_embed_proj_dim == 2560
    llama = fixtures.real_config("Llama-2-7b-hf")
    assert llama.rms_norm_eps == 1e-5 and llama.max_position_embeddings == 4096
    assert llama.rope_parameters["rope_theta"] == 10000.0
    smol = fixtures.real_config("smollm-135m")
    assert smol.tie_word_embeddings and smol.num_key_value_heads == 3
    with pytest.raises(ValueError):
        fixtures.real_config("gpt2")
