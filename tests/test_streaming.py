"""Streaming inference: chunked feeding equals one forward, held-back logits, save/load of the state."""

from __future__ import annotations

import peft
import pytest
import torch

import fixtures
from hmt_adapter import HMTConfig, testing
from hmt_adapter.engine import SegmentLayout
from hmt_adapter.inference.streaming import HMTStreamer, HMTStreamState, load_state, save_state

SEG = 8


def make_model(recall_query: str = "segment", **overrides) -> peft.PeftModel:
    overrides.setdefault("segment_length", SEG)
    return fixtures.perturbed_hmt_model(recall_query=recall_query, **overrides)


def forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def stream_logits(model, ids: torch.Tensor, chunk_sizes) -> torch.Tensor:
    streamer = HMTStreamer(model)
    state = streamer.init_state(ids.shape[0])
    outs, pos, i = [], 0, 0
    while pos < ids.shape[1]:
        c = chunk_sizes[i % len(chunk_sizes)]
        logits, state = streamer.feed(ids[:, pos : pos + c], state)
        outs.append(logits)
        pos, i = pos + c, i + 1
    logits, state = streamer.finish(state)
    outs.append(logits)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("recall_query", ["segment", "previous"])
def test_chunked_feeding_equals_one_forward(recall_query):
    model = make_model(recall_query)
    ids = torch.randint(4, 128, (2, 5 * SEG + 3))
    ref = forward_logits(model, ids)
    for sizes in ([1], [3], [SEG], [13], [ids.shape[1]], [5, 1, 11, 2]):
        got = stream_logits(model, ids, sizes)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=f"chunk sizes {sizes}")


def test_memory_changes_the_logits():
    """Non-vacuous: the streamed logits of later segments depend on earlier segments (through memory)."""
    model = make_model("previous")
    ids = torch.randint(4, 128, (1, 3 * SEG))
    other = ids.clone()
    other[:, :SEG] = torch.randint(4, 128, (1, SEG))
    a, b = stream_logits(model, ids, [5]), stream_logits(model, other, [5])
    assert (a[:, 2 * SEG :] - b[:, 2 * SEG :]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "overrides", [dict(use_recall=False), dict(recall_window=2, num_sensory=0), dict(write_token="learned"),
                  dict(write_token="learned", memory_gate=True), dict(write_token="learned", recall_scale="log_n"),
                  dict(write_token="learned", recall_null=True), dict(write_token="learned", recall_sharpen_beyond=2)]
)
def test_chunked_feeding_other_configs(overrides):
    model = make_model("segment", **overrides)
    ids = torch.randint(4, 128, (1, 6 * SEG + 5))
    ref = forward_logits(model, ids)
    torch.testing.assert_close(stream_logits(model, ids, [3]), ref, atol=1e-4, rtol=1e-4)


def test_state_is_bounded():
    model = make_model("segment", recall_window=3)
    streamer = HMTStreamer(model)
    state = streamer.init_state(1)
    for _ in range(9):
        _, state = streamer.feed(torch.randint(4, 128, (1, 5)), state, return_logits=False)
        assert len(state.cache) <= 3
        assert state.position_in_segment < SEG
        if state.kv is not None:
            assert state.kv.get_seq_length() <= model.peft_config["default"].positions_per_segment
    assert state.segment == 45 // SEG and state.tokens_seen == 45


def test_held_back_logits_segment_vs_previous():
    width = HMTConfig(segment_length=SEG).summary_length  # 4
    ids = torch.randint(4, 128, (1, 2 * SEG))
    for recall_query, expected_second_segment in (
        ("previous", [1] * SEG),
        ("segment", [0] * (width - 1) + [width] + [1] * (SEG - width)),
    ):
        streamer = HMTStreamer(make_model(recall_query))
        state = streamer.init_state(1)
        released = []
        for t in range(ids.shape[1]):
            logits, state = streamer.feed(ids[:, t : t + 1], state)
            released.append(logits.shape[1])
        assert released[:SEG] == [1] * SEG  # segment 0 reads m_0: nothing to wait for
        assert released[SEG:] == expected_second_segment, recall_query


def test_finish_releases_held_tokens_like_a_short_last_segment():
    model = make_model("segment")
    ids = torch.randint(4, 128, (1, SEG + 2))  # the last segment has 2 < summary_length tokens
    streamer = HMTStreamer(model)
    state = streamer.init_state(1)
    first, state = streamer.feed(ids, state)
    assert first.shape[1] == SEG and state.held_back == 2
    rest, state = streamer.finish(state)
    assert rest.shape[1] == 2 and state.held_back == 0
    torch.testing.assert_close(torch.cat([first, rest], 1), forward_logits(model, ids), atol=1e-4, rtol=1e-4)
    assert not rest.requires_grad


def test_kv_write_position_equals_segment_pass():
    """The cached path (prefix, one token at a time, then [m]) gives segment_pass's memory hidden state (the paper's
    layout, where the write slot repeats m)."""
    model = make_model("segment", write_token="memory")
    runner = model.base_model.runner()
    with torch.no_grad():
        x = runner.bb.embed(torch.randint(4, 128, (2, SEG)))
        sensory = runner.bb.embed(torch.randint(4, 128, (2, 3)))
        memory = torch.randn(2, x.shape[-1])
        hidden_ref, e_ref = runner.segment_pass(memory, sensory, x, torch.full((2,), SEG))
        layout = SegmentLayout.of(sensory)
        assert (layout.token_position(0), layout.write_position(SEG)) == (4, 4 + SEG)  # [m ; 3 sensory ; x ; m]
        hidden, kv = runner.extend(layout.prefix(memory, sensory, x[:, :2]), None, 0)
        pieces = [hidden[:, 4:]]
        for t in range(2, SEG):
            h, kv = runner.extend(x[:, t : t + 1], kv, 4 + t)
            pieces.append(h)
        e, _ = runner.extend(layout.write_slot(memory, x), kv, 4 + SEG)
    torch.testing.assert_close(torch.cat(pieces, 1), hidden_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e[:, 0], e_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cut", [SEG + 2, 2 * SEG + 6, 3 * SEG])  # held back / in the KV cache / at a border
def test_save_and_resume(tmp_path, cut):
    model = make_model("segment")
    ids = torch.randint(4, 128, (2, 4 * SEG + 1))
    ref = stream_logits(model, ids, [3])
    streamer = HMTStreamer(model)
    state = streamer.init_state(2)
    outs = []
    for pos in range(0, cut, 3):
        logits, state = streamer.feed(ids[:, pos : min(pos + 3, cut)], state)
        outs.append(logits)
    path = tmp_path / "state.safetensors"
    save_state(state, path)
    del state
    state = load_state(path, model)
    assert isinstance(state, HMTStreamState) and state.kv is None
    logits, state = streamer.feed(ids[:, cut:], state)
    outs.append(logits)
    logits, state = streamer.finish(state)
    outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=1e-4, rtol=1e-4)


def test_load_into_other_config_is_an_error(tmp_path):
    model = make_model("segment")
    streamer = HMTStreamer(model)
    _, state = streamer.feed(torch.randint(4, 128, (1, 2 * SEG + 1)), streamer.init_state(1))
    path = tmp_path / "state.safetensors"
    save_state(state, path)
    other = make_model("segment", segment_length=SEG * 2)
    with pytest.raises(ValueError, match="segment_length"):
        load_state(path, other)
    with pytest.raises(ValueError, match="another config"):
        HMTStreamer(other).feed(torch.randint(4, 128, (1, 2)), state)
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="Could not read"):
        load_state(bogus, model)


def test_input_errors():
    model = make_model("segment")
    streamer = HMTStreamer(model)
    state = streamer.init_state(2)
    with pytest.raises(ValueError, match="rows"):
        streamer.feed(torch.randint(4, 128, (1, 3)), state)
    with pytest.raises(ValueError, match="integer"):
        streamer.feed(torch.randn(2, 3), state)
    with pytest.raises(ValueError, match="batch_size"):
        streamer.init_state(0)
    with pytest.raises(TypeError, match="HMT adapter"):
        HMTStreamer(testing.tiny_causal_lm("llama"))


@pytest.mark.parametrize("model_type", ["opt-proj", "gpt2"])
def test_chunked_feeding_other_backbones(model_type):
    """The cached path (explicit position ids, DynamicCache) also matches the forward on non-Llama backbones."""
    config = HMTConfig(task_type="CAUSAL_LM", segment_length=SEG, num_sensory=3, recall_dim=16)
    model = peft.get_peft_model(testing.tiny_causal_lm(model_type), config).eval()
    ids = torch.randint(4, 128, (1, 3 * SEG + 3))
    torch.testing.assert_close(stream_logits(model, ids, [5]), forward_logits(model, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["segment", "previous"])
def test_whole_segments_fed_together_share_one_summary_pass(mode):
    """A long prompt fed at once costs one backbone pass per segment plus ONE batched summary pass, as the
    forward does (it cost one summary pass per segment before)."""
    model = make_model(mode)
    decoder = model.get_base_model().base_model
    calls = [0]
    handle = decoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    streamer = HMTStreamer(model)
    state = streamer.init_state(2)
    ids = torch.randint(4, 128, (2, 4 * SEG))
    logits, state = streamer.feed(ids, state)
    handle.remove()
    assert calls[0] == 4 + 1
    if mode == "previous":  # every logit is released at once and equals the forward's
        torch.testing.assert_close(logits, forward_logits(model, ids), atol=1e-5, rtol=1e-5)
