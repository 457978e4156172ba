"""The long-context tasks (benchmarks/lab/tasks.py): deterministic, evidence at the requested depth, one-token
answers, chance computed right; and the long-context benchmark's training episodes."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace

import pytest

from benchmarks.lab import retrieval as R
from benchmarks.lab import tasks as T
from benchmarks.lab.corpus import TINY_TEXT as TEXT
from benchmarks.lab.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([TEXT, T.task_sentences(repeats=5)], vocab_size=600)


@pytest.fixture(scope="module")
def stream(tok):
    return tok(TEXT, add_special_tokens=False).input_ids


def test_answers_are_single_tokens_and_chance_is_one_over_candidates(tok, stream) -> None:
    vocab = T.Vocab.of(tok)
    examples = T.make_examples("needle", tok, stream, vocab, 300, 10, seed=0)
    for e in examples:
        assert all(len(tok(c, add_special_tokens=False).input_ids) == 1 for c in e["choices"])
    assert T.chance(examples) == pytest.approx(1 / len(vocab.keys))


@pytest.mark.parametrize("task", ["needle", "facts_qa1", "facts_qa2"])
def test_generation_is_deterministic_and_spreads_depths(tok, stream, task) -> None:
    vocab = T.Vocab.of(tok)
    a = T.make_examples(task, tok, stream, vocab, 400, 10, seed=3)
    b = T.make_examples(task, tok, stream, vocab, 400, 10, seed=3)
    assert a == b
    assert sorted({e["depth"] for e in a}) == list(T.DEPTHS)
    for e in a:
        n = len(tok(e["context"], add_special_tokens=False).input_ids)
        assert abs(n - 400) <= 12  # decode/re-encode may merge a few tokens at the seams


@pytest.mark.parametrize("depth", T.DEPTHS)
def test_needle_sits_at_the_requested_depth(tok, stream, depth) -> None:
    vocab = T.Vocab.of(tok)
    e = T.needle_example(tok, stream, vocab, 1000, depth, random.Random(0))
    key = e["choices"][e["answer"]].strip()
    position = e["context"].index(f"The secret word is {key}.") / len(e["context"])
    assert abs(position - depth) < 0.1
    assert e["context"].endswith("What is the secret word? The secret word is")


def _key_positions(tok, examples):
    """Where each example's key token sits in its (re-tokenized) context."""
    out = []
    for e in examples:
        ids = tok(e["context"], add_special_tokens=False).input_ids
        cue = tok(" The secret word is", add_special_tokens=False).input_ids
        start = next(i for i in range(len(ids)) if ids[i : i + len(cue)] == cue)  # the needle (the question is last)
        out.append(start + len(cue))
    return out


def test_spread_offsets_keep_each_depths_segment_and_draw_the_offset_inside_it(tok, stream) -> None:
    """The depth grid puts every key of one depth at one offset of its segment (lengths are multiples of the
    segment); with ``segment_length`` the key stays in that segment at a drawn offset, recorded as ``offset``."""
    vocab, seg, length = T.Vocab.of(tok), 32, 32 * 16
    grid = T.make_examples("needle", tok, stream, vocab, length, 60, seed=1)
    spread = T.make_examples("needle", tok, stream, vocab, length, 60, seed=1, segment_length=seg)
    assert [e["depth"] for e in spread] == [e["depth"] for e in grid]
    assert "offset" not in grid[0]
    for depth in T.DEPTHS:
        at_grid = {p for p, e in zip(_key_positions(tok, grid), grid) if e["depth"] == depth}
        at_spread = [(p, e) for p, e in zip(_key_positions(tok, spread), spread) if e["depth"] == depth]
        assert len({p % seg for p in at_grid}) == 1  # one offset per depth on the grid
        assert {p // seg for p, _ in at_spread} == {p // seg for p in at_grid}  # the same segment ...
        assert len({p % seg for p, _ in at_spread}) >= 6  # ... at offsets drawn inside it
        assert all(p % seg == e["offset"] for p, e in at_spread)
    last = [e for e in spread if e["depth"] == 1.0]
    assert all(e["context"].endswith("What is the secret word? The secret word is") for e in last)
    with pytest.raises(ValueError, match="needle only"):
        T.make_examples("facts_qa1", tok, stream, vocab, length, 5, seed=1, segment_length=seg)
    only_last = T.make_examples("needle", tok, stream, vocab, length, 8, seed=1, segment_length=seg, depths=(1.0,))
    assert all(p // seg == 15 for p in _key_positions(tok, only_last))  # every key inside the last segment
    with pytest.raises(ValueError, match=r"depths must be relative depths in \[0, 1\]"):
        T.make_examples("needle", tok, stream, vocab, length, 5, seed=1, depths=(100,))


def test_facts_answer_is_the_last_place_of_the_asked_person(tok, stream) -> None:
    vocab = T.Vocab.of(tok)
    for seed in range(20):
        e = T.facts_example(tok, stream, vocab, 600, 0.5, random.Random(seed), kind="qa1")
        who = re.search(r"Where is (\w+)\?", e["context"]).group(1)
        moves = re.findall(rf"{who} went to the (\w+)\.", e["context"])
        assert e["choices"][e["answer"]].strip() == moves[-1]
        e2 = T.facts_example(tok, stream, vocab, 600, 0.75, random.Random(seed), kind="qa2")
        obj = re.search(r"Where is the (\w+)\?", e2["context"]).group(1)
        holder = re.search(rf"(\w+) picked up the {obj}\.", e2["context"]).group(1)
        assert e2["choices"][e2["answer"]].strip() == re.findall(rf"{holder} went to the (\w+)\.", e2["context"])[-1]


def test_written_task_is_an_lm_eval_multiple_choice_task(tok, stream, tmp_path) -> None:
    vocab = T.Vocab.of(tok)
    examples = T.make_examples("needle", tok, stream, vocab, 200, 3, seed=0)
    path = T.write_task(tmp_path, "lc_needle_200", examples)
    text = path.read_text()
    assert "output_type: multiple_choice" in text and str(tmp_path / "lc_needle_200.jsonl") in text
    rows = [json.loads(line) for line in (tmp_path / "lc_needle_200.jsonl").read_text().splitlines()]
    assert rows == examples
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager  # here: lm-eval is optional (the [eval] extra)

    assert "lc_needle_200" in TaskManager(include_path=str(tmp_path)).all_tasks


def test_hmt_training_episodes_put_the_needle_beyond_the_window_and_grow_in_length(tok, stream) -> None:
    """evidence="beyond": no training episode can be answered from the last segment + sensory memory; with the
    curriculum the episodes (read in order) start at 2 segments and reach the maximum by half-way."""
    vocab = T.Vocab.of(tok)
    s = R.quick(segment_length=32, hmt_steps=20, hmt_batch=2, max_train_segments=6)
    data = R.train_dataset(tok, stream, vocab, s, num_sensory=s.num_sensory)
    needle = tok(" The secret word is", add_special_tokens=False).input_ids
    segments = []
    for ids, mask in zip(data["input_ids"], data["completion_mask"]):
        answer_at = mask.index(1)
        starts = [i for i in range(answer_at) if ids[i : i + len(needle)] == needle]
        assert len(starts) >= 2  # the needle and the question
        assert starts[0] + len(needle) + 2 <= answer_at - s.segment_length - s.num_sensory  # key token + "." too
        segments.append(-(-len(ids) // s.segment_length))
    half = len(segments) // 2
    # (the context is decoded and re-tokenized, which can merge a few tokens: a 6-segment draw may count as 5)
    assert max(segments[:4]) <= 3 and max(segments[half:]) >= s.max_train_segments - 1
    anywhere = R.train_dataset(tok, stream, vocab, replace(s, evidence="anywhere", curriculum=False), s.num_sensory)
    assert anywhere["input_ids"] != data["input_ids"]


def _segments(data, segment_length: int) -> list[int]:
    return [-(-len(ids) // segment_length) for ids in data["input_ids"]]


def test_curriculum_ramp_fraction_sets_when_the_longest_inputs_arrive(tok, stream) -> None:
    """The longest training input reaches the maximum after ``curriculum_ramp_fraction`` of the episodes: with 1.0
    the first half never holds a maximum-length input, with 0.25 the second quarter already does; 0.5 (the default)
    draws exactly the episodes the benchmark drew before the knob existed (its old formula, ``2 * i / total``)."""
    vocab = T.Vocab.of(tok)
    s = R.quick(segment_length=32, hmt_steps=24, hmt_batch=2, max_train_segments=8)
    slow = _segments(R.train_dataset(tok, stream, vocab, replace(s, curriculum_ramp_fraction=1.0), 4), 32)
    fast = _segments(R.train_dataset(tok, stream, vocab, replace(s, curriculum_ramp_fraction=0.25), 4), 32)
    n = len(slow)
    assert max(slow[: n // 2]) <= 5  # at most 2 + 6 * 0.5 segments (+1 for re-tokenization)
    assert max(fast[n // 4 : n // 2]) >= 7
    assert R.train_dataset(tok, stream, vocab, s, 4)["input_ids"] == R.train_dataset(
        tok, stream, vocab, replace(s, curriculum_ramp_fraction=0.5), 4)["input_ids"]


def test_hmt_seed_draws_other_episodes_and_defaults_to_the_backbone_seed(tok, stream) -> None:
    vocab = T.Vocab.of(tok)
    s = R.quick(segment_length=32, hmt_steps=6, hmt_batch=2, max_train_segments=4, seed=3)
    same = R.train_dataset(tok, stream, vocab, replace(s, hmt_seed=3), 4)["input_ids"]
    assert R.train_dataset(tok, stream, vocab, s, 4)["input_ids"] == same
    assert R.train_dataset(tok, stream, vocab, replace(s, hmt_seed=4), 4)["input_ids"] != same
    assert R.adapter_seed(s) == 3 and R.adapter_seed(replace(s, hmt_seed=7)) == 7


def test_drill_episode_answers_every_person_with_their_last_move(tok, stream) -> None:
    vocab = T.Vocab.of(tok)
    rng = random.Random(4)
    for _ in range(20):
        e = T.random_episode(tok, stream, vocab, 62, rng, ("facts_qa1_drill",))
        moves = re.findall(r"(\w+) went to the (\w+)\.", e["context"])
        last = dict(moves)  # in text order: each person's last move wins
        answered = re.findall(r"Where is (\w+)\? \1 is in the (\w+)\.", e["context"])
        asked = re.findall(r"Where is (\w+)\?", e["context"])
        assert len(asked) == 3 and len(set(asked)) == 3 and len(answered) == 2
        assert all(last[name] == place for name, place in answered)
        assert e["choices"][e["answer"]] == " " + last[asked[-1]]
        assert e["context"].endswith(f"{asked[-1]} is in the")
