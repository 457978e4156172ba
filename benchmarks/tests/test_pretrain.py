"""The retrieval backbone's pretraining (benchmarks/lab/pretrain.py): its stopping rule and its cache key."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import torch

from benchmarks.lab import pretrain
from benchmarks.lab import tasks as T
from benchmarks.lab.backbone import tiny_backbone
from benchmarks.lab.corpus import TINY_TEXT as TEXT
from benchmarks.lab.settings import RetrievalSettings, quick_retrieval
from benchmarks.lab.tokenizer import train_tokenizer


def _tiny(**overrides):
    s = quick_retrieval(vocab_size=600, hidden_size=32, num_layers=1, num_heads=2, segment_length=64,
                        pretrain_steps=4, pretrain_batch=2, pretrain_check_every=2, pretrain_min_steps=0,
                        target_in_window=0.0, **overrides)
    tok = train_tokenizer([TEXT, T.task_sentences(repeats=5)], vocab_size=s.vocab_size)
    torch.manual_seed(0)
    return s, tok, tiny_backbone(s, len(tok)), torch.tensor(tok(TEXT, add_special_tokens=False).input_ids)


def test_pretraining_waits_for_the_qa1_target_and_logs_both_in_window_accuracies() -> None:
    s, tok, model, stream = _tiny()
    done = pretrain.pretrain_with_episodes(model, tok, stream, T.Vocab.of(tok), s, lambda _: None)
    assert done["steps"] == 2  # the needle target (0) is met at the first check
    assert set(done["curve"][0]) >= {"needle_in_window", "qa1_in_window"}
    s, tok, model, stream = _tiny(target_qa1_in_window=1.01)  # a qa1 target no backbone meets: runs to the cap
    done = pretrain.pretrain_with_episodes(model, tok, stream, T.Vocab.of(tok), s, lambda _: None)
    assert done["steps"] == 4 and len(done["curve"]) == 2


def test_pretraining_episodes_come_from_pretrain_tasks() -> None:
    import random

    s, tok, _, stream = _tiny(pretrain_tasks=("facts_qa1",))
    question = tok(" Where is", add_special_tokens=False).input_ids
    secret = tok(" The secret word is", add_special_tokens=False).input_ids
    batch, answers = pretrain._episode_batch(tok, stream, stream.tolist(), T.Vocab.of(tok),
                                             replace(s, episode_fraction=1.0, pretrain_batch=6),
                                             random.Random(0), torch.Generator().manual_seed(0))
    assert answers == [(i, 63) for i in range(6)]  # one answer per episode, its last token
    for row in batch.tolist():
        windows = [row[i : i + len(question)] for i in range(len(row))]
        assert question in windows and secret not in [row[i : i + len(secret)] for i in range(len(row))]


def test_backbone_key_keeps_the_old_keys_at_the_defaults_and_changes_with_the_later_fields() -> None:
    s = quick_retrieval(corpus="austen", seed=1)
    old = json.dumps({f: getattr(s, f) for f in pretrain.BACKBONE_FIELDS}, sort_keys=True)  # the key before them
    assert pretrain.backbone_key(s) == "austen-seed1-" + hashlib.sha256(old.encode()).hexdigest()[:10]
    keys = {pretrain.backbone_key(s), pretrain.backbone_key(replace(s, target_qa1_in_window=0.9)),
            pretrain.backbone_key(replace(s, pretrain_tasks=("needle", "facts_qa1")))}
    assert len(keys) == 3
    assert RetrievalSettings().target_qa1_in_window == 0.0


def test_pretrain_min_facts_mixes_in_episodes_with_fewer_facts_and_is_checked() -> None:
    import random

    import pytest

    s, tok, model, stream = _tiny(pretrain_tasks=("facts_qa1",))
    went = tok(" went to the", add_special_tokens=False).input_ids

    def facts_per_row(settings) -> set[int]:
        batch, _ = pretrain._episode_batch(tok, stream, stream.tolist(), T.Vocab.of(tok),
                                           replace(settings, episode_fraction=1.0, pretrain_batch=24),
                                           random.Random(0), torch.Generator().manual_seed(0))
        return {sum(row[i : i + len(went)] == went for i in range(len(row))) for row in batch.tolist()}

    assert facts_per_row(s) <= {6, 7}  # 6 facts, and in half the rows an earlier move of the person asked about
    assert min(facts_per_row(replace(s, pretrain_min_facts=1))) < 6
    with pytest.raises(ValueError, match="pretrain_min_facts"):
        pretrain.pretrain_with_episodes(model, tok, stream, T.Vocab.of(tok), replace(s, pretrain_min_facts=0),
                                        lambda _: None)
    assert pretrain.backbone_key(replace(s, pretrain_min_facts=2)) != pretrain.backbone_key(s)


def test_dense_qa1_rows_carry_several_answers_each_the_last_place_of_the_person_asked() -> None:
    import random

    import pytest

    s, tok, model, stream = _tiny(pretrain_tasks=("needle", "facts_qa1_dense"))
    vocab = T.Vocab.of(tok)
    batch, answers = pretrain._episode_batch(tok, stream, stream.tolist(), vocab,
                                             replace(s, episode_fraction=1.0, pretrain_batch=24),
                                             random.Random(0), torch.Generator().manual_seed(0))
    dense_rows = {r for r, at in answers if at != 63 or sum(1 for x, _ in answers if x == r) > 1}
    assert dense_rows and len(answers) > 24  # drills among the episodes, several answers in a drill row
    places = {tok(" " + p, add_special_tokens=False).input_ids[0]: p for p in vocab.places}
    for r in dense_rows:
        text = tok.decode(batch[r].tolist())
        assert "secret" not in text and (batch[r] != 0).all()  # a whole window of drill, no padding
        for row, at in answers:
            if row != r:
                continue
            before = tok.decode(batch[r, :at].tolist())
            asked = before.rsplit("Where is ", 1)[1].split("?")[0]
            last_move = before.rsplit(f"{asked} went to the ", 1)[1].split(".")[0]
            assert places[int(batch[r, at])] == last_move
    with pytest.raises(ValueError, match="another task"):
        pretrain.pretrain_with_episodes(model, tok, stream, vocab, replace(s, pretrain_tasks=("facts_qa1_dense",)),
                                        lambda _: None)
    assert pretrain.backbone_key(replace(s, pretrain_weight_decay=0.0)) != pretrain.backbone_key(s)


def test_drill_people_and_question_share_shape_the_drill_rows_and_are_checked() -> None:
    import random

    import pytest

    s, tok, model, stream = _tiny(pretrain_tasks=("needle", "facts_qa1_dense"))
    vocab = T.Vocab.of(tok)

    def drills(people: int, share: float) -> tuple[set[str], int, int]:
        names, moves, questions = set(), 0, 0
        rng = random.Random(0)
        for _ in range(40):
            ids, _ = T.facts_dense_row(tok, vocab, 64, rng, people, share)
            text = tok.decode(ids)
            names.update(n for n in vocab.names if f"{n} went to" in text)
            moves, questions = moves + text.count(" went to the "), questions + text.count("Where is ")
        return names, moves, questions

    few, many = drills(3, 0.5), drills(6, 0.2)
    assert len(few[0]) == len(vocab.names)  # each window draws its own people from the names
    assert many[1] / many[2] > 2 * few[1] / few[2]  # a smaller question share: more moves before each question
    for r in range(20):  # the people of one window
        ids, _ = T.facts_dense_row(tok, vocab, 64, random.Random(r), 2, 0.2)
        assert len({n for n in vocab.names if f"{n} went to" in tok.decode(ids)}) <= 2
    for bad in (dict(drill_people=1), dict(drill_people=len(vocab.names) + 1), dict(drill_question_share=0.0),
                dict(drill_question_share=1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            pretrain.pretrain_with_episodes(model, tok, stream, vocab, replace(s, **bad), lambda _: None)
    changes = (dict(), dict(drill_people=5), dict(drill_question_share=0.25))
    keys = {pretrain.backbone_key(replace(s, **c)) for c in changes}
    assert len(keys) == 3 and pretrain.backbone_key(replace(s, drill_people=3)) == pretrain.backbone_key(s)


def _drill_setup():
    """A tiny run with drills among its tasks, its task vocabulary and each place's token id -> place."""
    s, tok, model, stream = _tiny(pretrain_tasks=("needle", "facts_qa1_dense"))
    vocab = T.Vocab.of(tok)
    return s, tok, model, stream, vocab, {tok(" " + p, add_special_tokens=False).input_ids[0]: p for p in vocab.places}


def test_stale_questions_ask_the_person_named_longest_ago_and_filler_keeps_the_answers_right() -> None:
    import random
    import re

    import pytest

    s, tok, model, stream, vocab, places = _drill_setup()
    corpus = stream.tolist()
    for r in range(10):
        ids, at = T.facts_dense_row(tok, vocab, 64, random.Random(r), 3, 0.5, stale_share=1.0)
        named, where, sentence = {}, {}, 0
        for move, asked in re.findall(r" (\w+) went to the \w+\.| Where is (\w+)\?", tok.decode(ids[: at[-1]])):
            if asked:  # every question asks whoever has gone unnamed longest
                assert named[asked] == min(named[w] for w in where)
            who = move or asked
            named[who], sentence = sentence, sentence + 1
            where[who] = True
    fillers = 0
    for r in range(10):
        ids, at = T.facts_dense_row(tok, vocab, 64, random.Random(r), 3, 0.5, 0.5, filler_share=0.4, stream=corpus)
        text = tok.decode(ids)
        fillers += len(re.sub(r" (\w+ went to the \w+|Where is \w+\? \w+ is in the \w+)\.", "", text).strip()) > 0
        for a in at:  # filler between the facts and the question, the answer is still the last move's place
            before = tok.decode(ids[:a])
            asked = before.rsplit("Where is ", 1)[1].split("?")[0]
            assert places[ids[a]] == before.rsplit(f"{asked} went to the ", 1)[1].split(".")[0]
    assert fillers >= 8
    with pytest.raises(ValueError, match="stream"):
        T.facts_dense_row(tok, vocab, 64, random.Random(0), filler_share=0.3)
    for bad in (dict(drill_stale_share=1.5), dict(drill_filler_share=1.0), dict(pretrain_schedule="linear")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            pretrain.pretrain_with_episodes(model, tok, stream, vocab, replace(s, **bad), lambda _: None)
    changes = (dict(), dict(drill_stale_share=0.5), dict(drill_filler_share=0.2), dict(pretrain_schedule="cosine"))
    assert len({pretrain.backbone_key(replace(s, **c)) for c in changes}) == 4


def test_binding_examples_ask_either_person_and_answer_their_place() -> None:
    import random

    _, tok, _, _ = _tiny()
    vocab = T.Vocab.of(tok)
    examples = T.binding_examples(tok, vocab, 40, random.Random(0))
    asked_first = 0
    for e in examples:
        first, second, question = e["context"].split(". ", 2)
        asked = question.split("Where is ")[1].split("?")[0]
        owner = first if first.split()[0] == asked else second
        assert owner.split()[0] == asked and e["choices"][e["answer"]].strip() == owner.split()[-1]
        asked_first += owner is first
    assert 0 < asked_first < 40


def test_drill_hard_after_holds_the_stale_questions_and_filler_back_until_the_binding_probe_shows(monkeypatch) -> None:
    import pytest

    s, tok, model, stream = _tiny(pretrain_tasks=("needle", "facts_qa1_dense"), drill_stale_share=0.5,
                                  drill_filler_share=0.2, drill_hard_after=0.9)
    s = replace(s, pretrain_steps=6, target_in_window=1.01)  # no early stop: runs every step
    seen = []
    batch = pretrain._episode_batch

    def record(tokenizer, stream_, filler, vocab, settings, rng, gen):
        seen.append((settings.drill_stale_share, settings.drill_filler_share))
        return batch(tokenizer, stream_, filler, vocab, settings, rng, gen)

    monkeypatch.setattr(pretrain, "_episode_batch", record)
    probes = iter([0.0, 0.0, 0.5,   # step 2: needle, qa1, two facts (50%: not yet)
                   0.0, 0.0, 0.95,  # step 4: the binding shows
                   0.0, 0.0, 0.0])
    monkeypatch.setattr(T, "in_window_accuracy", lambda *a: next(probes))
    done = pretrain.pretrain_with_episodes(model, tok, stream, T.Vocab.of(tok), s, lambda _: None)
    assert done["drills_hard_from"] == 4
    assert seen == [(0.0, 0.0)] * 4 + [(0.5, 0.2)] * 2
    with pytest.raises(ValueError, match="drill_hard_after"):
        pretrain.pretrain_with_episodes(model, tok, stream, T.Vocab.of(tok), replace(s, drill_hard_after=2.0),
                                        lambda _: None)
    assert pretrain.backbone_key(s) != pretrain.backbone_key(replace(s, drill_hard_after=0.0))


def test_pretrain_tasks_bound_replace_the_tasks_once_the_binding_probe_reaches_90_percent(monkeypatch) -> None:
    import pytest

    drills, prose = ("needle", "facts_qa1_dense", "facts_qa1_dense"), ("needle", "facts_qa1_dense", "facts_qa1")
    s, tok, model, stream = _tiny(pretrain_tasks=drills, pretrain_tasks_bound=prose)
    s = replace(s, pretrain_steps=6, target_in_window=1.01)  # no early stop: runs every step
    seen = []
    batch = pretrain._episode_batch

    def record(tokenizer, stream_, filler, vocab, settings, rng, gen):
        seen.append(settings.pretrain_tasks)
        return batch(tokenizer, stream_, filler, vocab, settings, rng, gen)

    monkeypatch.setattr(pretrain, "_episode_batch", record)
    probes = iter([0.0, 0.0, 0.85,  # step 2: needle, qa1, two facts (85%: not yet)
                   0.0, 0.0, 0.9,   # step 4: the binding shows
                   0.0, 0.0, 0.0])  # step 6: a later dip does not switch back
    monkeypatch.setattr(T, "in_window_accuracy", lambda *a: next(probes))
    done = pretrain.pretrain_with_episodes(model, tok, stream, T.Vocab.of(tok), s, lambda _: None)
    assert done["tasks_bound_from"] == 4
    assert seen == [drills] * 4 + [prose] * 2
    for bad, match in ((("facts_qa1_dense",), "pretrain_tasks_bound 'facts_qa1_dense' needs another task"),
                       (("needle", "qa3"), r"pretrain_tasks_bound has unknown tasks \['qa3'\]")):
        with pytest.raises(ValueError, match=match):
            pretrain.check_episode_settings(replace(s, pretrain_tasks_bound=bad))
    assert pretrain.backbone_key(s) != pretrain.backbone_key(replace(s, pretrain_tasks_bound=()))


def test_spread_drills_put_the_answer_one_to_n_facts_back_with_even_odds() -> None:
    import collections
    import random
    import re

    import pytest

    s, tok, model, stream, vocab, places = _drill_setup()
    back = collections.Counter()
    for r in range(150):
        ids, at = T.facts_dense_row(tok, vocab, 64, random.Random(r), 3, spread=5)
        assert len(ids) == 64 and at
        for a in at:
            before, asked = tok.decode(ids[:a]).rsplit(" Where is ", 1)
            episode = re.split(r" Where is \w+\? \w+ is in the \w+\.", before)[-1]  # since the last answer
            asked = asked.split("?")[0]
            moves = re.findall(r" (\w+) went to the (\w+)\.", episode)
            assert 1 <= len(moves) <= 5 and re.sub(r" \w+ went to the \w+\.", "", episode) == ""
            last = max(i for i, (who, _) in enumerate(moves) if who == asked)  # their last move is in the episode
            assert places[ids[a]] == moves[last][1]
            back[len(moves) - last] += 1
    assert set(back) == {1, 2, 3, 4, 5}
    total = sum(back.values())
    assert max(back.values()) < 2.5 * min(back.values()), back  # the default drills: mostly one or two back
    assert back[1] / total < 0.45
    for bad, message in ((dict(drill_spread=1), "drill_spread must be 0"), (dict(drill_spread=13), "drill_spread"),
                         (dict(drill_spread=4, drill_stale_share=0.5), "takes neither"),
                         (dict(drill_spread=4, drill_question_share=0.25), "takes neither")):
        with pytest.raises(ValueError, match=message):
            pretrain.pretrain_with_episodes(model, tok, stream, vocab, replace(s, **bad), lambda _: None)
    assert pretrain.backbone_key(replace(s, drill_spread=6)) != pretrain.backbone_key(s)
    assert pretrain.backbone_key(replace(s, drill_spread=0)) == pretrain.backbone_key(s)
