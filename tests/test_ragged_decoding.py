"""A batch of prompts of different lengths decodes in ONE backbone call per new token (issue 10, part 3).

Rows sit at different positions in their segments and roll over at different steps; the shared KV cache with a
per-row mask must give each row what it gets alone, and cost one call per token plus the roll-over calls.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import fixtures
from hmt_adapter import testing

SEG = 8
PAD = testing.PAD_TOKEN_ID


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.numel() for p in prompts)
    batch = torch.full((len(prompts), width), PAD)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - p.numel() :], mask[i, width - p.numel() :] = p, 1
    return batch, mask


@contextlib.contextmanager
def count_backbone_calls(model):
    """Count the calls of the decoder stack (what `Backbone.run` calls): a list of (batch, width) per call."""
    calls: list[tuple[int, int]] = []
    decoder = model.get_base_model().base_model
    handle = decoder.register_forward_pre_hook(
        lambda _m, _args, kwargs: calls.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    try:
        yield calls
    finally:
        handle.remove()


def roll_steps(lengths: list[int], new_tokens: int) -> set[int]:
    """Decoding steps (1-based `advance` calls) at which some row's segment fills: the row fed its
    (l + step)-th token, a multiple of SEG. The prompt's own last token is fed by the prefill."""
    return {step for step in range(1, new_tokens) for n in lengths if (n + step) % SEG == 0}


def greedy(model, ids, n, **kwargs):
    return model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, eos_token_id=None, **kwargs)


@pytest.mark.parametrize("use_recall", [True, False])
def test_ragged_batch_costs_one_backbone_call_per_new_token(use_recall: bool) -> None:
    model = fixtures.perturbed_hmt_model(recall_query="segment", use_recall=use_recall)
    lengths = [5, 13, 16, 20]  # 5 and 13 fill their segments at the same step (different segment indices)
    gen = torch.Generator().manual_seed(0)
    batch, mask = left_padded([torch.randint(4, 128, (n,), generator=gen) for n in lengths])
    new = 2 * SEG + 3
    with count_backbone_calls(model) as prefill:
        greedy(model, batch, 1, attention_mask=mask)  # the prompts only: no decoding step
    with count_backbone_calls(model) as calls:
        greedy(model, batch, new, attention_mask=mask)
    decode = calls[len(prefill) :]
    assert calls[: len(prefill)] == prefill
    rolls = roll_steps(lengths, new)
    assert len(rolls) >= 3 and any(((5 + s) % SEG == 0) and ((13 + s) % SEG == 0) for s in rolls)
    per_roll = 3 if use_recall else 2  # write slot, [summary pass,] new segment's prefix
    assert len(decode) == (new - 1) + per_roll * len(rolls)
    token_steps = [c for c in decode if c == (len(lengths), 1)]
    assert len(token_steps) >= new - 1  # every step is one call over all four rows


@pytest.mark.parametrize("recall_query", ["segment", "previous"])
def test_rows_rolling_over_at_different_steps_equal_each_row_alone(recall_query: str) -> None:
    model = fixtures.perturbed_hmt_model(recall_query=recall_query)
    lengths = [3, 8, 13, 21, 30]  # 8: the prompt ends at a border; the others roll at different steps
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 128, (n,), generator=gen) for n in lengths]
    batch, mask = left_padded(prompts)
    new = 2 * SEG + 5
    out = greedy(model, batch, new, attention_mask=mask, return_dict_in_generate=True, output_logits=True)
    width = batch.shape[1]
    for i, p in enumerate(prompts):
        alone = greedy(model, p.unsqueeze(0), new, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(out.sequences[i, width - p.numel() :], alone.sequences[0]), i
        for t in range(new):
            torch.testing.assert_close(out.logits[t][i], alone.logits[t][0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("write_token,gate", [("memory", False), ("learned", False), ("learned", True)])
def test_ragged_batch_with_previous_query_is_the_teacher_forced_forward(write_token: str, gate: bool) -> None:
    model = fixtures.perturbed_hmt_model(recall_query="previous", write_token=write_token, memory_gate=gate)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(4, 128, (n,), generator=gen) for n in (6, 11, 17)]
    batch, mask = left_padded(prompts)
    new = 2 * SEG + 2
    out = greedy(model, batch, new, attention_mask=mask, return_dict_in_generate=True, output_logits=True)
    width = batch.shape[1]
    for i, p in enumerate(prompts):
        row = out.sequences[i, width - p.numel() :].unsqueeze(0)
        with torch.no_grad():
            forced = model(input_ids=row).logits[0]
        for t in range(new):
            torch.testing.assert_close(out.logits[t][i], forced[p.numel() - 1 + t], atol=1e-4, rtol=1e-4)


def test_a_finished_row_leaves_the_batch_and_the_others_go_on() -> None:
    model = fixtures.perturbed_hmt_model(recall_query="segment")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 128, (n,), generator=gen) for n in (7, 12, 4)]
    batch, mask = left_padded(prompts)
    free = greedy(model, batch, 2 * SEG, attention_mask=mask)
    width = batch.shape[1]
    eos = int(free[0, width + 2])  # row 0 produces it at its third step
    others = [i for i in (1, 2) if not bool((free[i, width:] == eos).any())]
    assert others  # with this seed rows 1 and 2 never produce row 0's token: they must go on alone
    out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=2 * SEG, do_sample=False,
                         eos_token_id=eos, pad_token_id=PAD)
    first = int((out[0, width:] == eos).nonzero()[0, 0])
    assert bool((out[0, width + first + 1 :] == PAD).all())
    for i in others:
        assert torch.equal(out[i], free[i]), i


@pytest.mark.parametrize("model_type,attn", [("llama", "eager"), ("opt", "sdpa"), ("gpt2", "sdpa"), ("mistral", "sdpa")])
def test_ragged_decoding_on_other_backbones_equals_each_row_alone(model_type: str, attn: str) -> None:
    import peft

    from hmt_adapter import HMTConfig

    base = testing.tiny_causal_lm(model_type, attn_implementation=attn)  # mistral: a sliding-window cache
    model = peft.get_peft_model(base, HMTConfig(task_type="CAUSAL_LM", segment_length=SEG, num_sensory=3,
                                                recall_dim=16, recall_query="previous")).eval()
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(4, 128, (n,), generator=gen) for n in (3, 10, 16)]
    batch, mask = left_padded(prompts)
    new = SEG + 4
    out = greedy(model, batch, new, attention_mask=mask, return_dict_in_generate=True, output_logits=True)
    for i, p in enumerate(prompts):
        alone = greedy(model, p.unsqueeze(0), new, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(out.sequences[i, batch.shape[1] - p.numel() :], alone.sequences[0]), i
        for t in range(new):
            torch.testing.assert_close(out.logits[t][i], alone.logits[t][0], atol=1e-4, rtol=1e-4)


def test_a_sliding_window_shorter_than_a_segment_is_refused_with_the_fix() -> None:
    import peft

    from hmt_adapter import HMTConfig

    base = testing.tiny_causal_lm("mistral", sliding_window=12)
    model = peft.get_peft_model(base, HMTConfig(task_type="CAUSAL_LM", segment_length=SEG, num_sensory=3)).eval()
    with pytest.raises(ValueError, match="segment_length to at most 7"):
        greedy(model, torch.randint(4, 128, (1, 5)), 3)
