"""write_token="learned": the write position holds a learned token w instead of repeating the memory m_n."""

import peft
import pytest
import torch

import fixtures
from hmt_adapter import HMTConfig
from hmt_adapter.engine import SegmentLayout

SEG = 8


def test_learned_write_token_is_an_adapter_parameter_and_round_trips(tmp_path):
    model = fixtures.perturbed_hmt_model(segment_length=SEG, write_token="learned")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("hmt_write_token" in n for n in names)
    paper = fixtures.perturbed_hmt_model(segment_length=SEG, write_token="memory")
    assert not any("hmt_write_token" in n for n, _ in paper.named_parameters())
    assert HMTConfig().write_token == "learned"  # the default since the retrieval runs (BENCHMARKS.md)
    ids = torch.randint(4, 128, (2, 3 * SEG + 2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(fixtures.tiny_causal_lm("llama"), tmp_path).eval()
    assert loaded.peft_config["default"].write_token == "learned"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)


def test_the_write_position_holds_w_and_position_zero_holds_m():
    """The memory written by segment 0 is the hidden state at w, computed with m_0 at position 0."""
    model = fixtures.perturbed_hmt_model(segment_length=SEG, write_token="learned")
    runner = model.base_model.runner()
    with torch.no_grad():
        x = runner.bb.embed(torch.randint(4, 128, (1, SEG)))
        sensory = x[:, :0]
        memory = runner.params.memory_init.unsqueeze(0)
        _, e_raw = runner.segment_pass(memory, sensory, x, torch.tensor([SEG]))
        by_hand = torch.cat([memory.unsqueeze(1), x, runner.params.write_token.view(1, 1, -1)], dim=1)
        expected = runner.bb.run(by_hand).last_hidden_state[:, -1]
        torch.testing.assert_close(e_raw, expected)
        wrong = torch.cat([memory.unsqueeze(1), x, memory.unsqueeze(1)], dim=1)  # the paper's layout
        assert not torch.allclose(e_raw, runner.bb.run(wrong).last_hidden_state[:, -1], atol=1e-3)
        assert SegmentLayout.of(sensory).write_position(SEG) == SEG + 1


def test_learned_write_token_gets_gradient():
    model = fixtures.perturbed_hmt_model(segment_length=SEG, write_token="learned").train()
    ids = torch.randint(4, 128, (2, 3 * SEG))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "hmt_write_token" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_bad_write_token_is_refused():
    with pytest.raises(ValueError, match="write_token"):
        HMTConfig(write_token="last")


def _write_token(model):
    return next(p for n, p in model.named_parameters() if "hmt_write_token" in n)


def test_write_token_init_text_starts_w_at_the_last_tokens_embedding_and_loads_without_the_tokenizer(tmp_path):
    """Like PEFT's prompt tuning from text: w starts at the input embedding of the text's last token; everything
    else starts as without it; a saved adapter loads (for inference) without reading the tokenizer again."""
    from hmt_adapter.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    backbone = fixtures.tiny_causal_lm("llama")
    target = backbone.get_input_embeddings().weight[tok(" is", add_special_tokens=False).input_ids[-1]].clone()
    config = dict(segment_length=SEG, write_token_init_text="what is the word? the word is",
                  tokenizer_name_or_path=str(tmp_path / "tok"))
    torch.manual_seed(0)
    model = peft.get_peft_model(backbone, HMTConfig(**config))
    assert torch.equal(_write_token(model).detach(), target)
    other_backbone = fixtures.tiny_causal_lm("llama")
    torch.manual_seed(0)
    plain = peft.get_peft_model(other_backbone, HMTConfig(segment_length=SEG))
    assert not torch.equal(_write_token(plain).detach(), target)
    others = lambda m: {n: p for n, p in m.named_parameters() if "hmt_" in n and "write_token" not in n}  # noqa: E731
    assert all(torch.equal(p, others(plain)[n]) for n, p in others(model).items())  # the same draws otherwise
    with torch.no_grad():
        _write_token(model).add_(0.5)  # trained
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "tok" / "tokenizer.json").unlink()  # the tokenizer is gone: loading must not need it
    loaded = peft.PeftModel.from_pretrained(fixtures.tiny_causal_lm("llama"), tmp_path / "adapter")
    assert torch.equal(_write_token(loaded), _write_token(model).detach())


@pytest.mark.parametrize("overrides, error, match", [
    ({"write_token_init_text": "is"}, ValueError, "tokenizer_name_or_path"),
    ({"write_token_init_text": "is", "tokenizer_name_or_path": "t", "write_token": "memory"}, ValueError,
     "write_token='learned'"),
    ({"write_token_init_text": "", "tokenizer_name_or_path": "t"}, TypeError, "non-empty string"),
    ({"write_token_init_text": "auto", "tokenizer_name_or_path": "t"}, ValueError, "prompt_end_text"),
])
def test_write_token_init_text_is_checked(overrides, error, match):
    with pytest.raises(error, match=match):
        HMTConfig(**overrides)


def test_write_token_init_text_beyond_the_backbones_vocabulary_or_unknown_is_refused(tmp_path):
    from hmt_adapter.testing import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match="is the unknown token"):
        peft.get_peft_model(fixtures.tiny_causal_lm("llama"), HMTConfig(
            segment_length=SEG, write_token_init_text="the zzqx", tokenizer_name_or_path=str(tmp_path / "tok")))
    tiny_tokenizer(vocab=[f"w{i}" for i in range(300)]).save_pretrained(tmp_path / "big")
    with pytest.raises(ValueError, match="beyond the backbone's 128 input embeddings"):
        peft.get_peft_model(fixtures.tiny_causal_lm("llama"), HMTConfig(
            segment_length=SEG, write_token_init_text="w299", tokenizer_name_or_path=str(tmp_path / "big")))
