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
