"""memory_gate=True: a zero-initialised gate g on the recalled memory, m_0 + tanh(g) (recall - m_0)."""

import peft
import pytest
import torch

import fixtures
from hmt_adapter import HMTConfig
from hmt_adapter.inference.streaming import HMTStreamer, load_state, save_state

SEG = 8


def gated_model(gate: float = 0.0, **overrides):
    """The perturbed tiny model (recall weights far from init) with the gate set to ``gate``."""
    model = fixtures.perturbed_hmt_model(segment_length=SEG, write_token="learned", memory_gate=True, **overrides)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "hmt_memory_gate" in name:
                param.fill_(gate)
    return model


def test_gate_is_a_zero_initialised_adapter_parameter_that_round_trips(tmp_path):
    fresh = peft.get_peft_model(fixtures.tiny_causal_lm("llama"),
                                HMTConfig(segment_length=SEG, recall_dim=16, memory_gate=True))
    gates = {n: p for n, p in fresh.named_parameters() if "hmt_memory_gate" in n}
    assert len(gates) == 1 and all(p.requires_grad and p.shape == () and p.item() == 0.0 for p in gates.values())
    assert not any("hmt_memory_gate" in n for n, _ in fixtures.perturbed_hmt_model(segment_length=SEG).named_parameters())
    model = gated_model(0.3)
    ids = torch.randint(4, 128, (2, 4 * SEG + 1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(fixtures.tiny_causal_lm("llama"), tmp_path).eval()
    assert loaded.peft_config["default"].memory_gate is True
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)


def test_a_closed_gate_reads_m0_in_every_segment_whatever_recall_says():
    """At init every segment reads m_0, as segment 0 does: the recall weights cannot change the output."""
    ids = torch.randint(4, 128, (2, 4 * SEG + 3))
    a, b = gated_model(0.0, seed=1), gated_model(0.0, seed=2)  # different recall / projection weights
    with torch.no_grad():
        for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            if "hmt_memory_init" in name or "hmt_write_token" in name or "hmt_summary" in name:
                pb.copy_(pa)  # same m_0, w and s; W_q, W_k and the projection differ
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits)
        opened = gated_model(1.0, seed=2)
        for (name, pa), (_, pb) in zip(a.named_parameters(), opened.named_parameters()):
            if "hmt_memory_init" in name or "hmt_write_token" in name or "hmt_summary" in name:
                pb.copy_(pa)
        assert (opened(input_ids=ids).logits[:, SEG:] - a(input_ids=ids).logits[:, SEG:]).abs().max() > 1e-3


def test_a_wide_open_gate_is_the_ungated_model():
    ids = torch.randint(4, 128, (1, 3 * SEG + 2))
    gated = gated_model(20.0)  # tanh(20) == 1 in float32
    plain = fixtures.perturbed_hmt_model(segment_length=SEG, write_token="learned")
    with torch.no_grad():
        source = dict(gated.named_parameters())
        for name, param in plain.named_parameters():
            param.copy_(source[name])
        torch.testing.assert_close(gated(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_the_closed_gate_gets_gradient_and_then_opens_the_path():
    model = gated_model(0.0).train()
    ids = torch.randint(4, 128, (2, 3 * SEG))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    gate = next(g for n, g in grads.items() if "hmt_memory_gate" in n)
    assert gate is not None and gate.abs() > 0
    q = next(p.grad for n, p in model.named_parameters() if "hmt_recall_q" in n)
    assert q is None or q.abs().max() == 0  # closed gate: recall does not reach the output yet


def test_stream_state_records_the_gate(tmp_path):
    model = gated_model(0.5)
    streamer = HMTStreamer(model)
    state = streamer.init_state(1)
    _, state = streamer.feed(torch.randint(4, 128, (1, 2 * SEG + 3)), state)
    save_state(state, tmp_path / "s.safetensors")
    other = fixtures.perturbed_hmt_model(segment_length=SEG, write_token="learned")
    with pytest.raises(ValueError, match="memory_gate"):
        load_state(tmp_path / "s.safetensors", other)
    paper = fixtures.perturbed_hmt_model(segment_length=SEG, write_token="memory", memory_gate=True)
    with pytest.raises(ValueError, match="write_token"):
        load_state(tmp_path / "s.safetensors", paper)


def test_gate_needs_recall():
    with pytest.raises(ValueError, match="memory_gate"):
        HMTConfig(memory_gate=True, use_recall=False)
    with pytest.raises(TypeError, match="memory_gate"):
        HMTConfig(memory_gate="yes")


def test_a_stream_state_records_every_config_field_that_changes_the_computation():
    """Derived, not listed: every HMTConfig field except the exempt training-only ones (a new field is included)."""
    from dataclasses import fields

    STATE_CONFIG_FIELDS, STATE_EXEMPT_FIELDS = HMTConfig.stream_state_fields(), HMTConfig.STREAM_STATE_EXEMPT

    own = [f.name for f in fields(HMTConfig) if f.name in HMTConfig.__annotations__]
    assert set(STATE_CONFIG_FIELDS) == set(own) - set(STATE_EXEMPT_FIELDS)
    assert {"write_token", "memory_gate", "lora_r", "recall_query"} <= set(STATE_CONFIG_FIELDS)
