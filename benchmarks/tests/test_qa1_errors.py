"""benchmarks/qa1_errors.py: each answer to an in-window qa1 question gets the kind of mistake it is, and the CLI
says what to change for a folder that holds no backbone."""

from __future__ import annotations

from benchmarks import qa1_errors as Q

PLACES = ["kitchen", "garden", "office", "hallway", "bathroom"]


def _example(context: str, answer: str) -> dict:
    return {"context": context, "choices": [" " + p for p in PLACES], "answer": PLACES.index(answer)}


def test_every_kind_of_answer() -> None:
    e = _example(" Mary went to the office. John went to the garden. Mary went to the kitchen. Sandra went to the"
                 " hallway. Where is Mary? Mary is in the", "kitchen")
    kinds = {p: Q.kind_of(e, PLACES.index(p)) for p in PLACES}
    assert kinds == {"kitchen": "right", "office": "earlier_place", "hallway": "latest_place",
                     "garden": "other_person", "bathroom": "not_in_context"}


def test_a_folder_without_a_backbone_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    assert Q.main(["--backbone", str(tmp_path), "--corpus", "austen", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no backbone/ and tokenizer/" in err and len(err.strip().splitlines()) == 1


def test_mentioned_places_are_what_a_copy_without_the_name_chooses_from() -> None:
    e = _example(" Mary went to the office. John went to the office. Sandra went to the hallway. Where is Mary? Mary"
                 " is in the", "office")
    assert Q.mentioned_places(e) == {"office", "hallway"}


def _tiny_tokenizer_and_reader(seen: list[str]):
    """A tiny tokenizer, held-out ids, and a stand-in model that answers from the text (the last place of the person
    asked), recording each context it reads in ``seen``."""
    import re
    from types import SimpleNamespace

    import torch

    from benchmarks.lab import tasks as T
    from benchmarks.lab.corpus import TINY_TEXT
    from benchmarks.lab.tokenizer import train_tokenizer

    tok = train_tokenizer([TINY_TEXT, T.task_sentences(repeats=5)], vocab_size=600)
    stream = tok(TINY_TEXT, add_special_tokens=False).input_ids

    class Reader(torch.nn.Module):
        def forward(self, input_ids):
            text = tok.decode(input_ids[0].tolist())
            seen.append(text)
            asked = re.findall(r"Where is (\w+)\?", text)[-1]
            place = [p for n, p in re.findall(r"(\w+) went to the (\w+)\.", text) if n == asked][-1]
            logits = torch.zeros(1, input_ids.shape[1], len(tok))
            logits[0, -1, tok(" " + place, add_special_tokens=False).input_ids[0]] = 1.0
            return SimpleNamespace(logits=logits)

    return tok, stream, Reader()


def test_accuracy_by_facts_asks_filler_free_questions_that_a_reader_of_the_text_answers() -> None:
    import re

    seen: list[str] = []
    tok, stream, reader = _tiny_tokenizer_and_reader(seen)
    assert Q.accuracy_by_facts(reader, tok, stream, 5, seed=0) == {k: 1.0 for k in Q.FACT_COUNTS}
    for text in seen:  # only facts and the question: no filler between them
        assert re.fullmatch(r"( \w+ went to the \w+\.)+ Where is \w+\? \w+ is in the", text)


def test_a_reader_of_the_text_answers_every_distance_and_gap() -> None:
    seen: list[str] = []
    tok, stream, reader = _tiny_tokenizer_and_reader(seen)
    assert Q.accuracy_by_distance(reader, tok, 4, seed=0) == {k: 1.0 for k in Q.DISTANCES}
    assert Q.accuracy_by_gap(reader, tok, stream, 4, seed=0) == {k: 1.0 for k in Q.GAPS}


def test_distance_examples_ask_the_person_that_many_facts_back_each_place_named_once() -> None:
    import re

    from benchmarks.lab import tasks as T
    from benchmarks.lab.corpus import TINY_TEXT
    from benchmarks.lab.tokenizer import train_tokenizer

    tok = train_tokenizer([TINY_TEXT, T.task_sentences(repeats=5)], vocab_size=600)
    by_distance = Q.distance_examples(tok, 8, seed=0)
    assert set(by_distance) == set(Q.DISTANCES)
    for back, examples in by_distance.items():
        assert len(examples) == 8
        for e in examples:
            facts = Q.facts_of(e)
            asked = re.search(r"Where is (\w+)\?", e["context"]).group(1)
            assert len(facts) == 6 and len({p for _, p in facts}) == 6 and len({n for n, _ in facts}) == 6
            assert facts[-back] == (asked, e["choices"][e["answer"]].strip())
            assert re.fullmatch(r"( \w+ went to the \w+\.)+ Where is \w+\? \w+ is in the", e["context"])


def test_gap_examples_put_that_much_held_out_text_between_the_facts_and_the_question() -> None:
    from benchmarks.lab import tasks as T
    from benchmarks.lab.corpus import TINY_TEXT
    from benchmarks.lab.tokenizer import train_tokenizer

    tok = train_tokenizer([TINY_TEXT, T.task_sentences(repeats=5)], vocab_size=600)
    stream = tok(TINY_TEXT, add_special_tokens=False).input_ids
    by_gap = Q.gap_examples(tok, stream, 6, seed=0)
    assert set(by_gap) == set(Q.GAPS) and Q.GAPS[0] == 0
    for gap, examples in by_gap.items():
        for e, plain in zip(examples, by_gap[0]):  # the same facts, question and answer at every gap
            assert e["answer"] == plain["answer"] and Q.facts_of(e) == Q.facts_of(plain) and len(Q.facts_of(e)) == 2
            facts, question = e["context"].split(" Where is ")
            assert question == plain["context"].split(" Where is ")[1]
            between = len(tok(facts, add_special_tokens=False).input_ids) - len(
                tok(plain["context"].split(" Where is ")[0], add_special_tokens=False).input_ids)
            assert abs(between - gap) <= 2  # re-tokenizing the text at its edges may merge a token or two
