"""Long-context retrieval tasks on real text, as lm-evaluation-harness task definitions (YAML + local JSONL).

- needle: the key sentence "The secret word is KEY." planted at a chosen depth (0-100%) of real text of a chosen
  length; the context ends with "What is the secret word? The secret word is" and the answer is KEY.
- facts_qa1 (BABILong qa1 style): facts "NAME went to the PLACE." about a few people scattered through the text;
  the question asks where one of them is; the answer is the last place that person went (one supporting fact).
- facts_qa2 (two supporting facts): "NAME picked up the OBJECT." then later "NAME went to the PLACE."; the question
  asks where the object is.

Every answer is a single token of the benchmark's tokenizer, and each task is lm-eval ``multiple_choice`` over its
candidate set: one loglikelihood pass over the context scores every candidate (lm-eval's logits cache groups
single-token continuations of one context). Accuracy is the argmax over candidates; chance is 1 / candidates.
The filler text is real prose (a corpus of `benchmarks.lab.corpus`).

The same tasks are the training episodes of the retrieval benchmarks (`random_episode`, `episode_ids`) and the probe of
a backbone's in-window answers (`in_window_accuracy`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

KEYS = ("apple", "river", "candle", "mirror", "garden", "silver", "thunder", "pepper", "castle", "forest",
        "rocket", "violin", "tiger", "orange", "window", "dragon", "island", "marble", "planet", "winter",
        "yellow", "hammer", "jacket", "pirate", "bridge", "cactus", "falcon", "lemon", "meadow", "saddle")
NAMES = ("Mary", "John", "Sandra", "Daniel", "Alice", "Peter", "Emma", "Oliver")
PLACES = ("kitchen", "garden", "office", "hallway", "bathroom", "bedroom", "cellar", "library")
OBJECTS = ("football", "apple", "milk", "key", "book", "hat")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def task_sentences(repeats: int = 200) -> str:
    """Every task sentence with every answer word, ``repeats`` times: added to the tokenizer's training text so
    that the answers become single tokens (the episodes are part of the backbone's training data anyway)."""
    lines = [f"The secret word is {k}. What is the secret word? The secret word is {k}." for k in KEYS]
    lines += [f"{n} went to the {p}. Where is {n}? {n} is in the {p}." for n in NAMES for p in PLACES]
    lines += [f"{n} picked up the {o}. Where is the {o}? The {o} is in the {p}." for n in NAMES for o in OBJECTS
              for p in PLACES[:2]]
    return " ".join(lines * repeats)


def single_token_words(tokenizer: Any, words: Sequence[str]) -> list[str]:
    """The words that the tokenizer encodes as ONE token after a space (so an answer is one token)."""
    return [w for w in words if len(tokenizer(" " + w, add_special_tokens=False).input_ids) == 1]


@dataclass
class Vocab:
    """The single-token candidate sets of one tokenizer."""

    keys: list[str]
    names: list[str]
    places: list[str]
    objects: list[str]

    @classmethod
    def of(cls, tokenizer: Any) -> "Vocab":
        vocab = cls(*(single_token_words(tokenizer, words) for words in (KEYS, NAMES, PLACES, OBJECTS)))
        if min(len(vocab.keys), len(vocab.names), len(vocab.places)) < 4 or len(vocab.objects) < 2:
            raise ValueError(f"Too few single-token answer words for this tokenizer: {vocab}. Use a larger vocabulary.")
        return vocab


def _filler(stream: Sequence[int], n: int, rng: random.Random) -> list[int]:
    start = rng.randrange(0, max(1, len(stream) - n))
    return list(stream[start : start + n])


def _position(depth: float, n: int) -> int:
    """The index a relative depth (0 = start, 1 = end) of ``n`` tokens points at."""
    return min(n, max(0, round(depth * n)))


def check_depths(depths: Sequence[float]) -> None:
    """ValueError unless ``depths`` are relative depths in [0, 1] (a percentage given by mistake, say)."""
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be relative depths in [0, 1], got {list(depths)}.")


def _plant(filler: list[int], pieces: list[tuple[float, list[int]]]) -> list[int]:
    """Insert token pieces into ``filler`` at relative positions (0 = start, 1 = end), in order of position."""
    out, last = [], 0
    for depth, piece in sorted(pieces, key=lambda p: p[0]):
        cut = max(last, _position(depth, len(filler)))
        out += filler[last:cut] + piece
        last = cut
    return out + filler[last:]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def needle_example(tokenizer: Any, stream: Sequence[int], vocab: Vocab, length: int, depth: float,
                   rng: random.Random, segment_length: int = 0, decoy_depth: Optional[float] = None
                   ) -> dict[str, Any]:
    """A needle example whose context is ``length`` tokens (before re-tokenization of the decoded text).

    With ``segment_length`` the key is moved inside the segment that ``depth`` puts it in, to an offset drawn
    uniformly among those that keep it there (the example's ``offset``); without it the key's offset follows from
    ``depth``, so every example of one depth and a length that is a multiple of the segment shares one offset.
    With ``decoy_depth`` (a training episode, no ``segment_length``) a second key sentence with another key is
    planted there too, and the answer is the key at ``depth`` (the example's ``decoy``: the other key)."""
    key = rng.choice(vocab.keys)
    needle = _encode(tokenizer, f" The secret word is {key}.")
    question = _encode(tokenizer, " What is the secret word? The secret word is")
    if decoy_depth is not None:
        if segment_length > 0:
            raise ValueError("A decoy needle is for training episodes: it takes no segment_length.")
        decoy_key = rng.choice([k for k in vocab.keys if k != key])
        decoy = _encode(tokenizer, f" The secret word is {decoy_key}.")
        filler = _filler(stream, max(0, length - len(needle) - len(decoy) - len(question)), rng)
        ids = _plant(filler, [(depth, needle), (decoy_depth, decoy)]) + question
        return {"context": tokenizer.decode(ids), "choices": [" " + k for k in vocab.keys],
                "answer": vocab.keys.index(key), "depth": depth, "length": length, "decoy": decoy_key}
    filler = _filler(stream, max(0, length - len(needle) - len(question)), rng)
    cut = _position(depth, len(filler))  # where `_plant` would put it
    at = len(needle) - 2  # the key's index in the needle (" KEY" then ".")
    if segment_length > 0:
        start = (cut + at) // segment_length * segment_length  # the segment the depth puts the key in
        lowest, highest = max(start, at), min(start + segment_length - 1, len(filler) + at)
        cut = rng.randint(lowest, highest) - at
    ids = filler[:cut] + needle + filler[cut:] + question
    example = {"context": tokenizer.decode(ids), "choices": [" " + k for k in vocab.keys],
               "answer": vocab.keys.index(key), "depth": depth, "length": length}
    if segment_length > 0:
        example["offset"] = (cut + at) % segment_length
    return example


def facts_example(tokenizer: Any, stream: Sequence[int], vocab: Vocab, length: int, depth: float, rng: random.Random,
                  kind: str = "qa1", num_facts: int = 6) -> dict[str, Any]:
    """A BABILong-style example: ``num_facts`` facts about 3 people; the supporting fact sits at ``depth``."""
    names = rng.sample(vocab.names, 3)
    target = names[0]
    facts: list[tuple[float, str]] = []
    place = rng.choice(vocab.places)
    if kind == "qa1":
        facts.append((depth, f" {target} went to the {place}."))
        question, answer_pool = f" Where is {target}? {target} is in the", vocab.places
    elif kind == "qa2":
        obj = rng.choice(vocab.objects)
        pick = rng.uniform(0.0, depth) if depth > 0 else 0.0
        facts += [(pick, f" {target} picked up the {obj}."), (depth, f" {target} went to the {place}.")]
        question, answer_pool = f" Where is the {obj}? The {obj} is in the", vocab.places
    else:
        raise ValueError(f"kind must be 'qa1' or 'qa2', got {kind!r}.")
    # distractors: other people move anywhere; the target only moves before its supporting fact
    while len(facts) < num_facts:
        who = rng.choice(names[1:])
        facts.append((rng.random(), f" {who} went to the {rng.choice(vocab.places)}."))
    if depth > 0 and rng.random() < 0.5:  # an earlier, superseded move of the target
        facts.append((rng.uniform(0.0, depth) * 0.999, f" {target} went to the {rng.choice(vocab.places)}."))
    pieces = [(d, _encode(tokenizer, t)) for d, t in facts]
    q_ids = _encode(tokenizer, question)
    filler = _filler(stream, max(0, length - sum(len(p) for _, p in pieces) - len(q_ids)), rng)
    ids = _plant(filler, pieces) + q_ids
    return {"context": tokenizer.decode(ids), "choices": [" " + p for p in answer_pool],
            "answer": answer_pool.index(place), "depth": depth, "length": length}


def facts_drill_example(tokenizer: Any, stream: Sequence[int], vocab: Vocab, length: int, rng: random.Random,
                        num_facts: int = 4) -> dict[str, Any]:
    """A pretraining-only qa1 episode with one question about each of 3 people at the end, the first two answered
    in the text ("Where is NAME? NAME is in the PLACE."), the last one the episode's answer. ``num_facts`` moves
    (at least one per person) sit at uniform depths in real text. A held-out qa1 example carries one answer token
    per window; this one carries three, so a small backbone sees the name-to-place lookup three times as often (the
    held-out tasks are unchanged: `facts_example`)."""
    names = rng.sample(vocab.names, 3)
    movers = names + [rng.choice(names) for _ in range(max(0, num_facts - 3))]
    facts = sorted((rng.random(), who, rng.choice(vocab.places)) for who in movers)
    last = {who: place for _, who, place in facts}  # sorted by depth: each person's last move wins
    pieces = [(d, _encode(tokenizer, f" {who} went to the {place}.")) for d, who, place in facts]
    asked = rng.sample(names, 3)
    tail = "".join(f" Where is {n}? {n} is in the {last[n]}." for n in asked[:2])
    q_ids = _encode(tokenizer, tail + f" Where is {asked[2]}? {asked[2]} is in the")
    filler = _filler(stream, max(0, length - sum(len(p) for _, p in pieces) - len(q_ids)), rng)
    ids = _plant(filler, pieces) + q_ids
    choices = [" " + p for p in vocab.places]
    return {"context": tokenizer.decode(ids), "choices": choices, "answer": vocab.places.index(last[asked[2]]),
            "length": length}


def facts_dense_row(tokenizer: Any, vocab: Vocab, length: int, rng: random.Random, people: int = 3,
                    question_share: float = 0.5, stale_share: float = 0.0, filler_share: float = 0.0,
                    stream: Sequence[int] = (), spread: int = 0) -> tuple[list[int], list[int]]:
    """A pretraining-only qa1 drill of exactly ``length`` tokens (no filler unless ``filler_share``): moves " NAME went
    to the PLACE." of ``people`` people and, for a share ``question_share`` of the sentences once someone has moved, a
    question and its answer " Where is NAME? NAME is in the PLACE." about someone who has (the place of their last
    move). Returns the ids and the index of every answer token.

    Each answer depends only on which name owns which place, so copying the latest or any place gets 1 in ``people``
    of them, several times per window (the held-out qa1 examples carry one answer, among filler). With the defaults
    they still leave a shortcut: most questions follow a sentence or two after the last mention of the person asked,
    and backbones drilled on them answer only there (BENCHMARKS.md, the drill variants).

    A share ``stale_share`` of the questions asks about the person named longest ago (by a move or an answer), the
    rest about anyone who has moved. A share ``filler_share`` of the sentences is instead 4-16 tokens of ``stream`` (text
    of the corpus), so a question need not follow the facts it asks about.

    With ``spread`` > 0 the row is instead a run of episodes, each 1..``spread`` moves and then one question, about a
    person whose last move is 1..``spread`` moves back with equal odds (the moves after it are the others'; an
    earlier one of theirs, superseded, in half the episodes that leave room for it), as in the held-out questions,
    where the drills above put the answer mostly one or two back (``question_share`` and ``stale_share`` do not
    apply; ``filler_share`` does, before each move). These rows carry a shortcut of their own: the asked person's
    move opens the episode in about 4 of 10 questions, and a backbone drilled on them learned that (BENCHMARKS.md)."""
    if filler_share > 0 and not stream:
        raise ValueError("filler_share > 0 needs a stream of corpus tokens to take filler from.")
    if spread > 0:
        return _spread_row(tokenizer, vocab, length, rng, people, spread, filler_share, stream)
    where: dict[str, str] = {}
    named: dict[str, int] = {}  # person -> the sentence that last named them
    names = rng.sample(vocab.names, people)
    ids: list[int] = []
    answers: list[int] = []
    sentence = -1
    while len(ids) < length:
        sentence += 1
        if filler_share > 0 and rng.random() < filler_share:
            ids += _filler(stream, rng.randint(4, 16), rng)
        elif where and rng.random() < question_share:
            if stale_share > 0 and rng.random() < stale_share:
                who = min(where, key=named.__getitem__)
            else:
                who = rng.choice(sorted(where))
            named[who] = sentence
            ids += _encode(tokenizer, f" Where is {who}? {who} is in the")
            answers.append(len(ids))
            ids += _encode(tokenizer, f" {where[who]}.")
        else:
            who, place = rng.choice(names), rng.choice(vocab.places)
            where[who], named[who] = place, sentence
            ids += _encode(tokenizer, f" {who} went to the {place}.")
    return ids[:length], [i for i in answers if i < length]


def _spread_row(tokenizer: Any, vocab: Vocab, length: int, rng: random.Random, people: int, spread: int,
                filler_share: float, stream: Sequence[int]) -> tuple[list[int], list[int]]:
    """`facts_dense_row` with ``spread``: episodes of 1..``spread`` moves and a question, the asked person's last
    move 1..``spread`` moves back with equal odds."""
    names = rng.sample(vocab.names, people)
    ids: list[int] = []
    answers: list[int] = []
    while len(ids) < length:
        asked, back = rng.choice(names), rng.randint(1, spread)  # the answer: ``back`` moves before the question
        moves = back + rng.randint(0, spread - back)
        last = moves - back  # the asked person's last move
        earlier = rng.randrange(last) if last > 0 and rng.random() < 0.5 else -1  # a superseded move of theirs
        others = [n for n in names if n != asked]
        for i in range(moves):
            if filler_share > 0 and rng.random() < filler_share:
                ids += _filler(stream, rng.randint(4, 16), rng)
            who = asked if i in (last, earlier) else rng.choice(others)
            place = rng.choice(vocab.places)
            if i == last:
                answer = place
            ids += _encode(tokenizer, f" {who} went to the {place}.")
        ids += _encode(tokenizer, f" Where is {asked}? {asked} is in the")
        answers.append(len(ids))
        ids += _encode(tokenizer, f" {answer}.")
    return ids[:length], [i for i in answers if i < length]


def binding_examples(tokenizer: Any, vocab: Vocab, n: int, rng: random.Random) -> list[dict[str, Any]]:
    """``n`` two-fact qa1 questions without filler (" X went to the P. Y went to the Q. Where is X? X is in the"),
    asking about either person: copying the latest or any place answers half of them, binding the name answers all
    (the probe of whether a backbone has formed the lookup at all)."""
    out = []
    for _ in range(n):
        (x, y), (px, py) = rng.sample(vocab.names, 2), rng.sample(vocab.places, 2)
        who, place = rng.choice(((x, px), (y, py)))
        out.append({"context": f" {x} went to the {px}. {y} went to the {py}. Where is {who}? {who} is in the",
                    "choices": [" " + p for p in vocab.places], "answer": vocab.places.index(place)})
    return out


def make_examples(task: str, tokenizer: Any, stream: Sequence[int], vocab: Vocab, length: int, n: int,
                  seed: int, segment_length: int = 0, depths: Sequence[float] = DEPTHS) -> list[dict[str, Any]]:
    """``n`` examples of ``task`` ('needle', 'facts_qa1', 'facts_qa2') at ``length`` tokens, ``depths`` in turn.
    With ``segment_length`` (needle only) each key sits at a uniformly drawn offset inside its depth's segment
    (`needle_example`); the examples are then a grid of their own (another name, another seed)."""
    if segment_length > 0 and task != "needle":
        raise ValueError(f"Offsets spread inside the segment are implemented for the needle only, not {task!r}.")
    check_depths(depths)
    if segment_length > 0:
        rng = random.Random(f"{task}-{length}-{seed}-offsets{segment_length}")
        return [needle_example(tokenizer, stream, vocab, length, depths[i % len(depths)], rng, segment_length)
                for i in range(n)]
    rng = random.Random(f"{task}-{length}-{seed}")
    return [example(task, tokenizer, stream, vocab, length, depths[i % len(depths)], rng) for i in range(n)]


def example(task: str, tokenizer: Any, stream: Sequence[int], vocab: Vocab, length: int, depth: float,
            rng: random.Random, num_facts: int = 6) -> dict[str, Any]:
    """One example of ``task`` ('needle', 'facts_qa1', 'facts_qa2') with its supporting fact at ``depth`` (a facts
    task with ``num_facts`` facts); 'facts_qa1_drill' is `facts_drill_example` (pretraining only, no depth)."""
    if task == "needle":
        return needle_example(tokenizer, stream, vocab, length, depth, rng)
    if task == "facts_qa1_drill":
        return facts_drill_example(tokenizer, stream, vocab, length, rng)
    return facts_example(tokenizer, stream, vocab, length, depth, rng, kind=task.split("_")[1], num_facts=num_facts)


def chance(examples: Sequence[dict[str, Any]]) -> float:
    """Accuracy of a uniform guess among each example's candidates."""
    return sum(1 / len(e["choices"]) for e in examples) / len(examples)


TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def question_digest(doc: dict[str, Any]) -> str:
    """A short fingerprint of one held-out question: its context, candidates and answer."""
    text = json.dumps([doc["context"], doc["choices"], doc["answer"]], ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def questions_digest(digests: Sequence[str]) -> str:
    """The fingerprint of a cell's questions in order (`question_digest` each): equal only for the same questions
    in the same order, what a result row's ``questions`` holds."""
    return hashlib.sha1("".join(digests).encode()).hexdigest()[:12]


def write_task(directory: Path, name: str, examples: Sequence[dict[str, Any]]) -> Path:
    """Write ``name.jsonl`` and the lm-eval task ``name.yaml`` into ``directory``; returns the YAML path."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in examples))
    path = directory / f"{name}.yaml"
    path.write_text(TASK_YAML.format(name=name, data=data.resolve()))
    return path


# ---- episodes: a task example as training data ------------------------------------------------------------------------
def episode_ids(tokenizer: Any, example: dict[str, Any]) -> tuple[list[int], int]:
    """(context ids + answer id, index of the answer token)."""
    ids = tokenizer(example["context"], add_special_tokens=False).input_ids
    answer = tokenizer(example["choices"][example["answer"]], add_special_tokens=False).input_ids
    return ids + answer, len(ids)


def random_episode(tokenizer, stream, vocab, length: int, rng: random.Random, tasks=("needle", "needle", "facts_qa1",
                   "facts_qa2"), max_depth: float = 1.0, depth: Optional[float] = None,
                   decoy_depth: Optional[float] = None, min_facts: int = 6) -> dict[str, Any]:
    """One training episode of a task drawn from ``tasks``, its supporting fact at ``depth`` (default: a uniform
    depth in [0, max_depth)); a needle episode also gets a decoy key sentence at ``decoy_depth`` when given (the
    facts tasks carry their own distractors). A facts episode has 6 facts, or with ``min_facts`` < 6 a number drawn
    uniformly from ``min_facts``..6 (easier episodes mixed in; the held-out tasks always have 6)."""
    task = rng.choice(tasks)
    if depth is None:
        depth = rng.random() * max_depth
    if task == "needle" and decoy_depth is not None:
        return needle_example(tokenizer, stream, vocab, length, depth, rng, decoy_depth=decoy_depth)
    num_facts = 6 if min_facts >= 6 or task in ("needle", "facts_qa1_drill") else rng.randint(min_facts, 6)
    return example(task, tokenizer, stream, vocab, length, depth, rng, num_facts=num_facts)


@torch.no_grad()
def answer_index(model, tokenizer, example: dict[str, Any]) -> int:
    """The index of the example's choice (a single token each) with the largest logit at the last position."""
    ids = torch.tensor([tokenizer(example["context"], add_special_tokens=False).input_ids])
    logits = model(input_ids=ids).logits[0, -1]
    cands = [tokenizer(c, add_special_tokens=False).input_ids[0] for c in example["choices"]]
    return max(range(len(cands)), key=lambda i: logits[cands[i]].item())


def in_window_accuracy(model, tokenizer, examples: list[dict[str, Any]]) -> float:
    """Share of in-window episodes whose answer is the argmax over the candidates at the last position."""
    model.eval()
    hits = sum(int(answer_index(model, tokenizer, e) == e["answer"]) for e in examples)
    model.train()
    return hits / len(examples)
