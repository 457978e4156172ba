"""How does a retrieval backbone answer qa1 inside its own window? Its answers sorted by kind of mistake.

    apt-get install -y r-cran-janeaustenr   # the corpus (Debian), see benchmarks/lab/corpus.py
    PYTHONPATH=. python -m benchmarks.qa1_errors --corpus austen \\
        --backbone benchmarks/output/backbones/austen-seed0-fcc3113c08 --questions 200

loads each ``--backbone`` (a folder of the long-context benchmark's backbone cache: ``backbone/`` and ``tokenizer/``,
what `benchmarks.lab.pretrain.prepare` stores), asks it ``--questions`` qa1 questions whose facts all sit inside its
window (6 facts about 3 people in held-out text of the corpus, as the benchmark's in-window probe) and sorts each
argmax answer over the 8 places into one kind:

* ``right``: the last place the person asked about went to;
* ``earlier_place``: a place that person went to before (superseded);
* ``latest_place``: the place of the last fact in the text, someone else's;
* ``other_person``: another place someone else went to;
* ``not_in_context``: a place no fact mentions.

A backbone that copies a place from the context but does not bind it to the name asked about answers ``right`` about
as often as copying any place the facts mention would (``copy_any_mentioned_place``), and its mistakes are
``other_person`` and ``latest_place``; one that has not learned to copy at all answers places ``not_in_context``. It
also asks each backbone ``--questions`` questions per number of facts (2, 3, 4, 6) with the facts back to back and no
filler (`accuracy_by_facts`): a lookup that holds for two facts and fades with more is soft or short-range (the next
probes tell which). And it asks ``--questions`` questions per distance (`accuracy_by_distance`: six people move once
each, the answer 1 to 6 facts back): a lookup that only reaches a sentence or two back is right there and near 1 in 6
further back. Last, two-fact questions with 0, 8, 16 or 32 tokens of held-out text before the question
(`accuracy_by_gap`): a shortcut that needs the question right after the facts falls towards half. Writes
``qa1_errors.json`` and ``qa1_errors.png`` (stacked shares per backbone, accuracy by number of facts, by distance and
by gap) to ``--output-dir`` (default benchmarks/output; ``--update-results``: benchmarks/results).
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path
from typing import Any, Optional

from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from benchmarks.lab import corpus as K
from benchmarks.lab import output as O
from benchmarks.lab import tasks as T

KINDS = ("right", "earlier_place", "latest_place", "other_person", "not_in_context")


def kind_of(example: dict[str, Any], predicted: int) -> str:
    """The kind (`KINDS`) of the answer ``predicted`` (an index into the example's choices) to a qa1 example."""
    if predicted == example["answer"]:
        return "right"
    place = example["choices"][predicted].strip()
    target = re.search(r"Where is (\w+)\?", example["context"]).group(1)
    moves = facts_of(example)
    if (target, place) in moves:
        return "earlier_place"
    if moves and moves[-1][1] == place:
        return "latest_place"
    if any(p == place for _, p in moves):
        return "other_person"
    return "not_in_context"


def sort_answers(model, tokenizer, stream: list[int], questions: int, window: int, seed: int) -> dict[str, Any]:
    """Shares of each kind over ``questions`` in-window qa1 questions (contexts of ``window - 2`` tokens)."""
    vocab = T.Vocab.of(tokenizer)
    rng = random.Random(seed)
    counts = dict.fromkeys(KINDS, 0)
    copy = 0.0
    for _ in range(questions):
        example = T.facts_example(tokenizer, stream, vocab, window - 2, rng.random(), rng)
        counts[kind_of(example, T.answer_index(model, tokenizer, example))] += 1
        copy += 1 / len(mentioned_places(example))
    return {"questions": questions, "shares": {k: v / questions for k, v in counts.items()},
            "copy_any_mentioned_place": copy / questions}


#: Numbers of facts of `accuracy_by_facts`.
FACT_COUNTS = (2, 3, 4, 6)


def accuracy_by_facts(model, tokenizer, stream: list[int], questions: int, seed: int) -> dict[int, float]:
    """Accuracy on ``questions`` qa1 questions per number of facts in `FACT_COUNTS`, the facts back to back with no
    filler (the others' moves are about up to 2 more people, and half the questions add an earlier move of the person
    asked about, as in the benchmark's examples of 6 facts). Where the lookup from the name asked to
    its place gets lost among more facts, this falls with the count while the 2-fact questions stay right."""
    vocab = T.Vocab.of(tokenizer)
    rng = random.Random(seed + 1)
    result = {}
    for count in FACT_COUNTS:
        examples = [T.facts_example(tokenizer, stream, vocab, 0, rng.random(), rng, num_facts=count)
                    for _ in range(questions)]
        result[count] = T.in_window_accuracy(model, tokenizer, examples)
    return result


#: How many facts back the answer sits in `accuracy_by_distance` (1: the last fact before the question).
DISTANCES = (1, 2, 3, 4, 5, 6)


def distance_examples(tokenizer, questions: int, seed: int) -> dict[int, list[dict[str, Any]]]:
    """``questions`` qa1 questions per distance in `DISTANCES`: six different people move once each, back to back with
    no filler, and the question asks about the one whose move is that many facts back (1: the last). Every place named
    once, so only the binding of name to place answers; the count of facts is fixed, only the distance varies."""
    vocab = T.Vocab.of(tokenizer)
    people = min(len(vocab.names), len(vocab.places), max(DISTANCES))
    rng = random.Random(seed + 2)
    out: dict[int, list[dict[str, Any]]] = {}
    for back in DISTANCES:
        if back > people:
            continue
        out[back] = []
        for _ in range(questions):
            names, places = rng.sample(vocab.names, people), rng.sample(vocab.places, people)
            who, place = names[people - back], places[people - back]
            facts = "".join(f" {n} went to the {p}." for n, p in zip(names, places))
            out[back].append({"context": f"{facts} Where is {who}? {who} is in the",
                              "choices": [" " + p for p in vocab.places], "answer": vocab.places.index(place)})
    return out


def accuracy_by_distance(model, tokenizer, questions: int, seed: int) -> dict[int, float]:
    """Accuracy on `distance_examples`: a lookup that reaches only a sentence or two back is right at distance 1-2 and
    falls to copying another person's place (1 in 6 here) further back, though it answers two facts perfectly."""
    return {back: T.in_window_accuracy(model, tokenizer, examples)
            for back, examples in distance_examples(tokenizer, questions, seed).items()}


#: Tokens of held-out text between two facts and the question in `accuracy_by_gap`.
GAPS = (0, 8, 16, 32)


def gap_examples(tokenizer, stream: list[int], questions: int, seed: int) -> dict[int, list[dict[str, Any]]]:
    """``questions`` two-fact questions (`benchmarks.lab.tasks.binding_examples`) per gap in `GAPS`: that many tokens of
    held-out text between the second fact and the question (the same facts and questions at every gap)."""
    vocab = T.Vocab.of(tokenizer)
    base = T.binding_examples(tokenizer, vocab, questions, random.Random(seed + 3))
    rng = random.Random(seed + 4)
    starts = [rng.randrange(0, max(1, len(stream) - max(GAPS))) for _ in base]
    out: dict[int, list[dict[str, Any]]] = {}
    for gap in GAPS:
        out[gap] = []
        for e, start in zip(base, starts):
            facts, question = e["context"].split(" Where is ", 1)
            text = tokenizer.decode(stream[start : start + gap]) if gap else ""
            out[gap].append({**e, "context": f"{facts}{text} Where is {question}"})
    return out


def accuracy_by_gap(model, tokenizer, stream: list[int], questions: int, seed: int) -> dict[int, float]:
    """Accuracy on `gap_examples`: a backbone that reads the name answers at every gap; one that learned "the last fact
    is about the person asked, or the one before it is" from drills where the question follows the facts answers the
    gap-0 questions and falls towards half (copying) once text comes between."""
    return {gap: T.in_window_accuracy(model, tokenizer, examples)
            for gap, examples in gap_examples(tokenizer, stream, questions, seed).items()}


def mentioned_places(example: dict[str, Any]) -> set[str]:
    """The places the example's facts name (the right one among them): a backbone that copies one of them without
    reading the name asked about is right 1 / len(these) of the time."""
    return {p for _, p in facts_of(example)}


def facts_of(example: dict[str, Any]) -> list[tuple[str, str]]:
    """The (name, place) of each "NAME went to the PLACE." in the example's context, in text order."""
    return re.findall(r"(\w+) went to the (\w+)\.", example["context"])


#: The line panels of the figure: (result key, x values, x label, title, the copying level in %, its label).
LINE_PANELS = (
    ("accuracy_by_facts_no_filler", FACT_COUNTS, "facts (back to back, no filler)", "right by number of facts",
     None, None),
    ("accuracy_by_distance", DISTANCES, "facts back (6 people, one move each, no filler)",
     "right by how far back the answer is", 100 / max(DISTANCES), "1 in 6 (copying)"),
    ("accuracy_by_gap", GAPS, "tokens of text between 2 facts and the question", "two facts, then text, then the question",
     50.0, "1 in 2 (copying)"),
)


def plot(payload: dict[str, Any], path: Path) -> None:
    """Top: each backbone's answers by kind, stacked. Below, one line per backbone: accuracy by number of facts without
    filler, by how many facts back the answer is, and on two facts by the text between the facts and the question."""
    plt = O.pyplot()
    names = list(payload["backbones"])
    fig = plt.figure(figsize=(max(11.0, 2.0 + 1.1 * len(names)), 7.6), layout="constrained")
    grid = fig.add_gridspec(2, 3)
    ax = fig.add_subplot(grid[0, :])
    bottom = [0.0] * len(names)
    for kind in KINDS:
        shares = [100 * payload["backbones"][n]["shares"][kind] for n in names]
        ax.bar(range(len(names)), shares, bottom=bottom, label=kind.replace("_", " "))
        bottom = [b + s for b, s in zip(bottom, shares)]
    ax.set_xticks(range(len(names)), [Path(n).name for n in names], rotation=12, fontsize=7)
    ax.set_ylabel("% of in-window qa1 answers")
    copy = [100 * payload["backbones"][n]["copy_any_mentioned_place"] for n in names]
    ax.scatter(range(len(names)), copy, marker="_", s=600, color="black", zorder=3,
               label="right by copying any mentioned place")
    ax.set_title(f"in-window qa1 answers by kind ({payload['corpus']}, {payload['questions']} each)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    for column, (key, xs, xlabel, title, level, level_label) in enumerate(LINE_PANELS):
        panel = fig.add_subplot(grid[1, column])
        for n in names:
            counts = payload["backbones"][n].get(key, {})
            panel.plot([int(k) for k in counts], [100 * v for v in counts.values()], marker="o", label=Path(n).name)
        if level is not None:
            panel.axhline(level, color="grey", linestyle=":", linewidth=1)
            panel.text(xs[-1], level + 2, level_label, fontsize=6, color="grey", ha="right")
        panel.set_xlabel(xlabel, fontsize=8)
        panel.set_ylabel("% right")
        panel.set_ylim(0, 105)
        panel.set_xticks(xs)
        panel.set_title(title, fontsize=9)
    handles, labels = panel.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside lower center", ncol=min(4, len(names)))
    O.save_figure(fig, path)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.qa1_errors", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", nargs="+", required=True, metavar="DIR",
                   help="backbone cache folders (each with backbone/ and tokenizer/)")
    p.add_argument("--corpus", required=True, help=f"the corpus the backbones were pretrained on: {sorted(K.CORPORA)}")
    p.add_argument("--questions", type=int, default=200)
    p.add_argument("--window", type=int, default=64, help="the backbone's window (the benchmark's segment length)")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    O.add_output_arguments(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    missing = [d for d in args.backbone if not (Path(d) / "backbone").is_dir() or not (Path(d) / "tokenizer").is_dir()]
    if missing:
        print(f"--backbone {' '.join(missing)}: no backbone/ and tokenizer/ there; pass folders of the long-context "
              "benchmark's --backbone-cache.", file=sys.stderr)
        return 2
    if args.questions < 1:
        print(f"--questions must be >= 1, got {args.questions}.", file=sys.stderr)
        return 2
    try:
        corpus = K.get(args.corpus)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    documents = corpus.documents()
    if not documents:
        print(corpus.missing_message(), file=sys.stderr)
        return 2
    O.quiet_torch_run(args.threads)
    _, heldout = K.split(documents, 0.15)
    payload: dict[str, Any] = {"command": O.quoted_command("PYTHONPATH=. python -m benchmarks.qa1_errors", argv),
                               "corpus": args.corpus, "questions": args.questions, "backbones": {}}
    for folder in args.backbone:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(Path(folder) / "tokenizer")
        model = AutoModelForCausalLM.from_pretrained(Path(folder) / "backbone").eval()
        stream = [t for doc in tokenizer(heldout, add_special_tokens=False).input_ids for t in doc]
        entry = sort_answers(model, tokenizer, stream, args.questions, args.window, args.seed)
        entry["accuracy_by_facts_no_filler"] = accuracy_by_facts(model, tokenizer, stream, args.questions, args.seed)
        entry["accuracy_by_distance"] = accuracy_by_distance(model, tokenizer, args.questions, args.seed)
        entry["accuracy_by_gap"] = accuracy_by_gap(model, tokenizer, stream, args.questions, args.seed)
        payload["backbones"][folder] = entry
        by_facts = ", ".join(f"{k} {100 * v:.0f}%" for k, v in entry["accuracy_by_facts_no_filler"].items())
        by_distance = ", ".join(f"{k} {100 * v:.0f}%" for k, v in entry["accuracy_by_distance"].items())
        by_gap = ", ".join(f"{k} {100 * v:.0f}%" for k, v in entry["accuracy_by_gap"].items())
        print(f"{folder}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in entry["shares"].items()) + "; copying any "
              f"mentioned place would be right {100 * entry['copy_any_mentioned_place']:.0f}%; right by facts "
              f"without filler: {by_facts}; by facts back (6 people): {by_distance}; two facts, tokens of text before the "
              f"question: {by_gap}", flush=True)
    O.write_result(O.output_dir(args), "qa1_errors", payload, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
