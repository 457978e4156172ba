"""benchmarks.question_border: a run's needle outcomes split by where each question's last token falls in its
segment, on questions whose token counts the test controls (one token per word)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from benchmarks import question_border as Q
from benchmarks.lab import tasks as T

WORDS = [f"w{i}" for i in range(40)]


def _doc(words: int, depth: float, length: int = 16) -> dict:
    return {"context": " ".join(WORDS[:words]), "choices": [" w1", " w2"], "answer": 0, "depth": depth,
            "length": length}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder: a word-level tokenizer (one token per word) and needle questions at 16 tokens, segments of 8.
    At depth 100%: 16 words (the last token closes segment 1) and 17 (it opens segment 2); at depth 0: 18 and 15."""
    word = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *WORDS])}, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=word, unk_token="<unk>").save_pretrained(tmp_path / "tokenizer")
    docs = [_doc(18, 0.0), _doc(15, 0.0), _doc(16, 1.0), _doc(17, 1.0)]
    (tmp_path / "long_context_tasks").mkdir()
    (tmp_path / "long_context_tasks" / "lc_needle_16.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return tmp_path


def _run(path: Path, outcomes: dict[float, str], docs: dict[float, list[dict]], segment_length: int = 8) -> Path:
    rows = [{"task": "needle", "method": "hmt_x", "context_tokens": 16, "depth": d, "accuracy": 0.0, "n": len(o),
             "outcomes": o, "questions": T.questions_digest([T.question_digest(x) for x in docs[d]])}
            for d, o in outcomes.items()]
    path.write_text(json.dumps({"settings": {"segment_length": segment_length}, "results": rows}))
    return path


def _docs(run_dir: Path) -> dict[float, list[dict]]:
    out: dict[float, list[dict]] = {}
    for line in (run_dir / "long_context_tasks" / "lc_needle_16.jsonl").read_text().splitlines():
        doc = json.loads(line)
        out.setdefault(doc["depth"], []).append(doc)
    return out


def test_outcomes_split_by_where_the_question_ends(run_dir: Path, tmp_path: Path) -> None:
    # right: the depth-0 question ending at offset 1 of segment 2 (past) and the depth-100% one closing segment 1
    run = _run(tmp_path / "a.json", {0.0: "10", 1.0: "10"}, _docs(run_dir))
    assert Q.main([str(run), "--tasks-from", str(run_dir), "--border-tokens", "2", "--output-dir",
                   str(tmp_path / "out")]) == 0
    payload = json.loads((tmp_path / "out" / "question_border.json").read_text())
    (cell,) = payload["runs"][0]["cells"]
    assert cell["past"] == {"right": 1, "asked": 2}  # 18 words (offset 1) right, 17 words (offset 0) wrong
    assert cell["rest"] == {"right": 1, "asked": 2}  # 15 words (offset 6) wrong, 16 words (offset 7) right
    assert cell["past_in_window"] == {"right": 0, "asked": 1} and cell["rest_in_window"] == {"right": 1, "asked": 1}
    assert (tmp_path / "out" / "question_border.png").is_file()
    # a border of one token: only the question ending on a segment's first token is past it
    Q.main([str(run), "--tasks-from", str(run_dir), "--border-tokens", "1", "--output-dir", str(tmp_path / "one")])
    (cell,) = json.loads((tmp_path / "one" / "question_border.json").read_text())["runs"][0]["cells"]
    assert cell["past"] == {"right": 0, "asked": 1} and cell["rest"] == {"right": 2, "asked": 3}


def test_other_questions_or_missing_outcomes_are_refused(run_dir: Path, tmp_path: Path, capsys) -> None:
    docs = _docs(run_dir)
    other = {**docs, 1.0: [docs[1.0][1], docs[1.0][0]]}  # the same questions in another order
    run = _run(tmp_path / "b.json", {0.0: "10", 1.0: "10"}, other)
    assert Q.main([str(run), "--tasks-from", str(run_dir), "--output-dir", str(tmp_path / "out")]) == 2
    assert "asked other questions" in capsys.readouterr().err
    payload = json.loads(_run(tmp_path / "c.json", {0.0: "10"}, docs).read_text())
    del payload["results"][0]["outcomes"]
    (tmp_path / "c.json").write_text(json.dumps(payload))
    assert Q.main([str(tmp_path / "c.json"), "--tasks-from", str(run_dir), "--output-dir", str(tmp_path / "o")]) == 2
    assert "--adapters-from" in capsys.readouterr().err
    assert Q.main([str(tmp_path / "missing.json"), "--tasks-from", str(run_dir)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert Q.main([str(run), "--tasks-from", str(tmp_path / "nowhere")]) == 2
    assert "long_context_tasks/" in capsys.readouterr().err
