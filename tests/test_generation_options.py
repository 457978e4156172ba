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

    from benchmarks.quality import train_tokenizer
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
