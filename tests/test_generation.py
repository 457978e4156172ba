"""Memory-aware generation: consistency with the forward, recall-query semantics, batching and options."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from transformers import GenerationConfig, TextStreamer

import fixtures
from hmt_adapter import testing

SEG = 8
PAD, EOS = testing.PAD_TOKEN_ID, testing.EOS_TOKEN_ID


def make_model(recall_query: str = "segment", **overrides) -> peft.PeftModel:
    overrides.setdefault("segment_length", SEG)
    return fixtures.perturbed_hmt_model(recall_query=recall_query, **overrides)


def greedy(model, ids, n, **kwargs):
    return model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, eos_token_id=None, **kwargs)


@torch.no_grad()
def known_prefix_reference(model, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits (1, T, V) under the generation rule for recall_query='segment', computed without any KV cache:
    segment n's query reads the first min(summary_length, prompt tokens in segment n) tokens of it."""
    runner = model.base_model.runner()
    seg, width = runner.config.segment_length, runner.config.summary_length
    state, out = runner.start(1, like=runner.bb.embed(tokens[:, :0])), []
    for n in range(math.ceil(tokens.shape[1] / seg)):
        x = runner.bb.embed(tokens[:, n * seg : (n + 1) * seg])
        known = min(width, max(0, prompt_len - n * seg))
        query = runner.summary_queries(x[:, :known], torch.tensor([known])) if n else None
        memory, _ = runner.memory_source(state, query).read(runner.params)
        hidden, e_raw = runner.segment_pass(memory, state.sensory, x, torch.tensor([x.shape[1]]))
        out.append(runner.bb.logits(hidden))
        state = runner.advance(state, x, e_raw)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("write_token,gate,scale,null", [("memory", False, "constant", False),
                                                         ("learned", False, "constant", False),
                                                         ("learned", True, "constant", False),
                                                         ("learned", False, "log_n", False),
                                                         ("learned", False, "constant", True)])
@pytest.mark.parametrize("prompt_len", [13, 2 * SEG])  # mid-segment, and exactly at a segment border
def test_previous_greedy_matches_teacher_forced_forward(prompt_len, write_token, gate, scale, null):
    model = make_model("previous", write_token=write_token, memory_gate=gate, recall_scale=scale, recall_null=null)
    ids = torch.randint(4, 128, (1, prompt_len))
    out = greedy(model, ids, 2 * SEG + 3)  # rolls over at least twice
    assert out.shape == (1, prompt_len + 2 * SEG + 3) and torch.equal(out[:, :prompt_len], ids)
    with torch.no_grad():
        logits = model(input_ids=out).logits
    assert torch.equal(logits[0, prompt_len - 1 : -1].argmax(-1), out[0, prompt_len:])


@pytest.mark.parametrize("prompt_len", [13, 2 * SEG, SEG + 2])
def test_segment_query_uses_known_prompt_tokens(prompt_len):
    model = make_model("segment", write_token="memory")  # the reference below writes the paper's [m ; x ; m]
    ids = torch.randint(4, 128, (1, prompt_len))
    out = greedy(model, ids, 2 * SEG + 3)
    ref = known_prefix_reference(model, out, prompt_len)
    assert torch.equal(ref[0, prompt_len - 1 : -1].argmax(-1), out[0, prompt_len:])
    # non-vacuous: the teacher-forced forward (queries from the generated tokens) reads other memories
    with torch.no_grad():
        forward = model(input_ids=out).logits
    assert (forward[0, prompt_len:] - ref[0, prompt_len:]).abs().max() > 1e-3


@pytest.mark.parametrize("recall_query", ["segment", "previous"])
def test_prompt_alone_equals_prompt_in_left_padded_batch(recall_query):
    model = make_model(recall_query)
    prompts = [torch.randint(4, 128, (n,)) for n in (13, 5, 2 * SEG, 13)]
    width = max(p.numel() for p in prompts)
    batch = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - p.numel() :], mask[i, width - p.numel() :] = p, 1
    out = greedy(model, batch, SEG + 2, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = greedy(model, p.unsqueeze(0), SEG + 2)
        assert torch.equal(out[i, width - p.numel() :], alone[0]), i


def test_eos_stops_rows_and_pads_them():
    model = make_model("previous")
    ids = torch.randint(4, 128, (2, 6))
    free = greedy(model, ids, 12)
    eos = int(free[0, 8])  # row 0 produces this token at its 3rd step
    out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    first = (out[0, 6:] == eos).nonzero()[0, 0].item()
    assert torch.equal(out[0, : 6 + first + 1], free[0, : 6 + first + 1])
    assert bool((out[0, 6 + first + 1 :] == PAD).all())
    if not bool((free[1, 6:] == eos).any()):
        assert torch.equal(out[1, : out.shape[1]], free[1, : out.shape[1]])


def test_sampling_options_and_num_return_sequences():
    model = make_model("segment")
    ids = torch.randint(4, 128, (2, 11))
    torch.manual_seed(0)
    a = model.generate(input_ids=ids, max_new_tokens=SEG, do_sample=True, temperature=0.7, top_p=0.9, top_k=20,
                       num_return_sequences=3, eos_token_id=None)
    torch.manual_seed(0)
    b = model.generate(input_ids=ids, max_new_tokens=SEG, do_sample=True, temperature=0.7, top_p=0.9, top_k=20,
                       num_return_sequences=3, eos_token_id=None)
    assert a.shape == (6, 11 + SEG) and torch.equal(a, b)
    assert torch.equal(a[:3, :11], ids[:1].expand(3, -1)) and torch.equal(a[3:, :11], ids[1:].expand(3, -1))
    assert len({tuple(r) for r in a[:, 11:].tolist()}) > 1  # samples differ
    top1 = model.generate(input_ids=ids, max_new_tokens=SEG, do_sample=True, top_k=1, eos_token_id=None)
    assert torch.equal(top1, greedy(model, ids, SEG))
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert model.generate(input_ids=ids, generation_config=config).shape == (2, 15)
    assert model.generate(input_ids=ids, max_length=14, eos_token_id=None).shape == (2, 14)


def test_unsupported_options_are_refused():
    model = make_model("segment")
    ids = torch.randint(4, 128, (1, 5))
    with pytest.raises(ValueError, match="Beam sampling"):
        model.generate(input_ids=ids, max_new_tokens=3, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="streamer"):
        model.generate(input_ids=ids, max_new_tokens=3, num_beams=2, streamer=TextStreamer(testing.tiny_tokenizer()))
    with pytest.raises(ValueError, match="streamer"):  # one sequence only, as in transformers
        model.generate(input_ids=ids.repeat(2, 1), max_new_tokens=3, streamer=TextStreamer(testing.tiny_tokenizer()))
    with pytest.raises(ValueError, match="output_attentions"):
        model.generate(input_ids=ids, max_new_tokens=3, return_dict_in_generate=True, output_attentions=True)
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(input_ids=ids, max_new_tokens=3, stop_strings=["cat"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(input_ids=torch.randint(4, 128, (1, 30)), max_length=20)
    with pytest.raises(ValueError, match="does not use"):
        model.generate(input_ids=ids, max_new_tokens=3, not_an_option=1)


def test_disabled_adapter_generates_like_the_backbone():
    model = make_model("segment")
    ids = torch.randint(4, 128, (1, 6))
    with model.disable_adapter():
        got = greedy(model, ids, 5)
    base = testing.tiny_causal_lm("llama").eval()
    assert torch.equal(got, base.generate(input_ids=ids, max_new_tokens=5, do_sample=False, eos_token_id=None))
