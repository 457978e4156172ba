"""transformers' generate options on HMT: per-step scores and logits, streamers, stop strings, the pipeline."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, pipeline
from transformers.generation.streamers import BaseStreamer

import fixtures
from hmt_adapter.testing import tiny_tokenizer

SEG = 8


class Collect(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.clone())

    def end(self) -> None:
        self.ended = True


def test_scores_and_logits_are_the_teacher_forced_logits_of_the_chosen_tokens() -> None:
    model = fixtures.perturbed_hmt_model(recall_query="previous")
    ids = torch.randint(4, 128, (1, 13), generator=torch.Generator().manual_seed(3))
    out = model.generate(input_ids=ids, max_new_tokens=2 * SEG + 3, do_sample=False, eos_token_id=None,
                         return_dict_in_generate=True, output_scores=True, output_logits=True)
    new = out.sequences.shape[1] - ids.shape[1]
    assert len(out.scores) == len(out.logits) == new
    with torch.no_grad():
        forced = model(input_ids=out.sequences).logits[0]  # (T, V), rolls over two segment borders
    for t in range(new):
        torch.testing.assert_close(out.logits[t][0], forced[ids.shape[1] - 1 + t], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.scores[t], out.logits[t])  # greedy without processors
        assert int(out.sequences[0, ids.shape[1] + t]) == int(out.scores[t].argmax())


def test_scores_are_processed_logits_under_sampling_settings() -> None:
    model = fixtures.perturbed_hmt_model(recall_query="previous")
    ids = torch.randint(4, 128, (1, 9))
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=True, top_k=3, temperature=0.7,
                         eos_token_id=None, return_dict_in_generate=True, output_scores=True, output_logits=True)
    for scores, logits in zip(out.scores, out.logits):
        assert int(torch.isfinite(scores).sum()) == 3  # top_k keeps three candidates
        kept = torch.isfinite(scores)
        torch.testing.assert_close(scores[kept], logits[kept] / 0.7)


def test_a_streamer_receives_exactly_the_returned_tokens() -> None:
    model = fixtures.perturbed_hmt_model()
    ids = torch.randint(4, 128, (1, 11))
    streamer = Collect()
    seq = model.generate(input_ids=ids, max_new_tokens=SEG + 2, do_sample=False, eos_token_id=None, streamer=streamer)
    assert streamer.ended
    assert torch.equal(streamer.chunks[0], ids)
    assert torch.equal(torch.cat(streamer.chunks[1:]), seq[0, ids.shape[1]:])


def test_stop_strings_stop_generation() -> None:
    import peft

    from benchmarks.lab.tokenizer import train_tokenizer
    from hmt_adapter import HMTConfig
    from hmt_adapter.testing import tiny_causal_lm

    tokenizer = train_tokenizer(["the cat sees the dog and the bird sings a song " * 50], vocab_size=300)
    base = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    model = peft.get_peft_model(base, HMTConfig(segment_length=SEG, num_sensory=2, recall_dim=8)).eval()
    ids = tokenizer("the cat sees the dog and the bird", return_tensors="pt").input_ids
    full = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=None)
    new = full[0, ids.shape[1]:]
    clean = [t for t in range(1, 12) if tokenizer.decode(new[t : t + 1]).isascii() and tokenizer.decode(new[t : t + 1]).strip()]
    assert clean, "the random model produced no printable token to stop on"
    stop = tokenizer.decode(new[clean[0] : clean[0] + 1])
    first_hit = next(t for t in range(12) if stop in tokenizer.decode(new[: t + 1]))
    stopped = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                             stop_strings=[stop], tokenizer=tokenizer, pad_token_id=0)
    assert stopped.shape[1] == ids.shape[1] + first_hit + 1
    assert torch.equal(stopped[0], full[0, : stopped.shape[1]])


def test_text_generation_pipeline_runs_hmt() -> None:
    model = fixtures.perturbed_hmt_model(recall_query="previous")
    tokenizer = tiny_tokenizer()
    prompt = " ".join(["the cat sees the dog ."] * 5)  # 30 tokens: several segments
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator(prompt, max_new_tokens=5, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    expected = model.generate(input_ids=ids, generation_config=GenerationConfig(max_new_tokens=5, do_sample=False),
                              pad_token_id=0)
    assert text == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


def _restricted(allowed: list[int]):
    """A logits processor that leaves only ``allowed`` tokens (a tiny vocabulary for exhaustive search)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Only(LogitsProcessor):
        def __call__(self, input_ids, scores):
            mask = torch.full_like(scores, float("-inf"))
            mask[:, allowed] = 0
            return scores + mask

    return LogitsProcessorList([Only()])


def test_one_beam_is_greedy() -> None:
    model = fixtures.perturbed_hmt_model(recall_query="previous")
    ids = torch.randint(4, 128, (2, 11))
    greedy = model.generate(input_ids=ids, max_new_tokens=SEG + 3, do_sample=False, eos_token_id=None)
    beam1 = model.generate(input_ids=ids, max_new_tokens=SEG + 3, do_sample=False, eos_token_id=None, num_beams=1)
    assert torch.equal(greedy, beam1)


def test_beam_search_across_a_roll_over_equals_brute_force() -> None:
    import itertools

    model = fixtures.perturbed_hmt_model(recall_query="previous")
    allowed = [5, 9, 17]
    ids = torch.randint(4, 128, (1, SEG - 1), generator=torch.Generator().manual_seed(7))  # a border after 1 token
    out = model.generate(input_ids=ids, max_new_tokens=3, num_beams=9, num_return_sequences=3, do_sample=False,
                         eos_token_id=None, length_penalty=0.0, logits_processor=_restricted(allowed),
                         return_dict_in_generate=True)
    best = []
    for cont in itertools.product(allowed, repeat=3):
        seq = torch.cat([ids, torch.tensor([cont])], dim=1)
        with torch.no_grad():
            logp = model(input_ids=seq).logits[0].float().log_softmax(-1)
        best.append((sum(logp[ids.shape[1] - 1 + i, t].item() for i, t in enumerate(cont)), cont))
    best.sort(reverse=True)
    assert [tuple(row[ids.shape[1]:].tolist()) for row in out.sequences] == [c for _, c in best[:3]]
    torch.testing.assert_close(out.sequences_scores, torch.tensor([s for s, _ in best[:3]]), atol=1e-4, rtol=1e-4)


def test_beam_search_batch_of_different_lengths_equals_each_prompt_alone() -> None:
    model = fixtures.perturbed_hmt_model(recall_query="previous")
    a, b = torch.randint(4, 128, (1, 13)), torch.randint(4, 128, (1, 6))
    kw = dict(max_new_tokens=SEG + 2, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    batch = torch.zeros(2, 13, dtype=torch.long)
    batch[0], batch[1, 7:] = a[0], b[0]
    mask = (torch.arange(13) >= torch.tensor([[0], [7]])).long()
    together = model.generate(input_ids=batch, attention_mask=mask, **kw)
    assert torch.equal(together[0, 13:], model.generate(input_ids=a, **kw)[0, 13:])
    assert torch.equal(together[1, 13:], model.generate(input_ids=b, **kw)[0, 6:])


def test_beam_search_with_eos_returns_finished_hypotheses() -> None:
    model = fixtures.perturbed_hmt_model(recall_query="previous")
    ids = torch.randint(4, 128, (1, 9))
    free = model.generate(input_ids=ids, max_new_tokens=6, num_beams=2, do_sample=False, eos_token_id=None)
    eos = int(free[0, ids.shape[1] + 2])  # the third token of the best unconstrained beam
    out = model.generate(input_ids=ids, max_new_tokens=6, num_beams=2, num_return_sequences=2, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    assert out.shape[0] == 2
    for row in out:
        new = row[ids.shape[1]:].tolist()
        if eos in new:  # a finished hypothesis ends at its EOS, then padding
            assert all(t == 0 for t in new[new.index(eos) + 1 :])
