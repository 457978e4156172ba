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
