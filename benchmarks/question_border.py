"""Does an adapter lose the held-out needles whose question ends just past a segment border?

    PYTHONPATH=. python -m benchmarks.question_border --tasks-from benchmarks/output/s24k2-python-docs-s0 \\
        benchmarks/output/{n100o-steps2k,s24k2}-python-docs-s0/long_context.json --training-rows 640

The long-context benchmark writes its held-out questions as text, and lm-eval tokenizes them again when it scores
them, so a context of nominal length L (a whole number of segments) comes out a few tokens longer or shorter. When
it comes out longer, the question's last token (the one whose logits pick the answer) opens a new segment: HMT then
sees the rest of the question and a needle "inside the last segment" only through sensory memory and the recall of
the latest memory, while the backbone's own window still holds them. On the Python docs this happens to about 4
questions in 10 at 64k tokens; on Austen almost never.

Reads the needle questions of ``--tasks-from`` (a run folder of `benchmarks.long_context`: its
``long_context_tasks/`` and ``tokenizer/``), finds where each question's last token falls in its segment, and splits
every given run's per-question outcomes (``long_context.json`` rows with ``outcomes``; the questions must be the
same, which the digests check) into the questions that end among the first ``--border-tokens`` tokens of a segment
and the rest, per length, with the needle inside the last segment (depth 100%) on its own. Writes
``question_border.json`` and ``question_border.png`` (accuracy on each side of the border, per run) into
``--output-dir`` (default benchmarks/output; ``--update-results``: benchmarks/results).

With ``--training-rows N`` it also draws the first N training rows each run's adapter was trained on (its stored
settings and method, the corpus's training documents tokenized with the run's tokenizer) and counts the rows whose
question ends past a border in the same way: what training showed the adapter of the questions it is asked.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from transformers import PreTrainedTokenizerFast

from benchmarks.lab import output as O
from benchmarks.lab import retrieval as R
from benchmarks.lab import tasks as T
from benchmarks.lab.corpus import split
from benchmarks.lab.pretrain import corpus_of
from benchmarks.lab.runs import method_rows, read_run


def question_ends(tokenizer: Any, task_dir: Path, segment_length: int) -> dict[tuple[int, float], dict[str, Any]]:
    """Per needle cell (length, depth), in lm-eval's doc order: each question's digest and where its last context
    token falls in its segment (0 = the segment's first token)."""
    cells: dict[tuple[int, float], dict[str, Any]] = {}
    for path in sorted(task_dir.glob("lc_needle_*.jsonl")):
        for line in path.read_text().splitlines():
            doc = json.loads(line)
            ids = tokenizer(doc["context"], add_special_tokens=False).input_ids
            cell = cells.setdefault((doc["length"], doc["depth"]), {"digests": [], "ends": []})
            cell["digests"].append(T.question_digest(doc))
            cell["ends"].append((len(ids) - 1) % segment_length)
    return cells


def split_run(rows: list[dict[str, Any]], cells: dict[tuple[int, float], dict[str, Any]], border: int,
              path: str) -> list[dict[str, Any]]:
    """One run's needle outcomes split by the border, per length: ``past`` (questions ending among the first
    ``border`` tokens of a segment) and ``rest``, each over all depths and with the needle in the last segment.
    Raises ValueError for rows without outcomes or other questions than ``cells``."""
    out: dict[int, dict[str, list[int]]] = {}
    for r in rows:
        if r.get("task") != "needle":
            continue
        key = (r["context_tokens"], r["depth"])
        if key not in cells:
            continue
        if "outcomes" not in r:
            raise ValueError(f"{path}: a needle row without per-question outcomes (scored before they were recorded); "
                             "score its adapters again with --adapters-from.")
        if r["questions"] != T.questions_digest(cells[key]["digests"]):
            raise ValueError(f"{path}: needle at {key[0]} tokens, depth {key[1]:.0%} asked other questions than "
                             "--tasks-from holds; pass the folder of a run with the same corpus, seed, "
                             "--needle-offsets, --examples and --examples-longest.")
        tally = out.setdefault(key[0], {k: [0, 0] for k in ("past", "rest", "past_in_window", "rest_in_window")})
        for outcome, end in zip(r["outcomes"], cells[key]["ends"]):
            side = "past" if end < border else "rest"
            for name in (side, side + "_in_window") if key[1] == 1.0 else (side,):
                tally[name][0] += outcome == "1"
                tally[name][1] += 1
    if not out:
        raise ValueError(f"{path}: no needle cell in common with --tasks-from.")
    return [{"context_tokens": n, **{k: {"right": v[0], "asked": v[1]} for k, v in t.items()}}
            for n, t in sorted(out.items())]


def plot(payload: dict[str, Any], path: Path) -> None:
    """One panel per length: accuracy on the questions past a border and on the rest, one pair of bars per run."""
    plt = O.pyplot()
    lengths = sorted({c["context_tokens"] for r in payload["runs"] for c in r["cells"]})
    fig, axes = plt.subplots(1, len(lengths), figsize=(1.6 + 1.5 * len(payload["runs"]) * len(lengths), 4.2),
                             squeeze=False)
    for ax, n in zip(axes[0], lengths):
        for i, run in enumerate(payload["runs"]):
            cell = next((c for c in run["cells"] if c["context_tokens"] == n), None)
            if cell is None:
                continue
            for j, side in enumerate(("past", "rest")):
                right, asked = cell[side]["right"], cell[side]["asked"]
                if asked:
                    ax.bar(i + 0.4 * j, 100 * right / asked, 0.38, color=("tab:red", "tab:blue")[j],
                           label=(f"ends among a segment's first {payload['border_tokens']} tokens", "ends later")[j]
                           if i == 0 else None)
                    ax.text(i + 0.4 * j, 100 * right / asked + 1, f"{right}/{asked}", ha="center", fontsize=7)
        ax.set_xticks([i + 0.2 for i in range(len(payload["runs"]))])
        ax.set_xticklabels([r["label"] for r in payload["runs"]], rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 110)
        ax.set_ylabel("needle accuracy (%)")
        ax.set_title(f"{n} tokens, every depth", fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
    O.save_figure(fig, path)


def training_row_ends(tokenizer: Any, tokenizer_path: str, settings: dict[str, Any], method: str, rows: int,
                      border: int, segment_length: int, streams: dict[str, list[int]]) -> dict[str, int]:
    """The first ``rows`` training rows of ``method`` under a run's stored ``settings`` (``tokenizer`` saved at
    ``tokenizer_path``): how many end their question past a border (the token that predicts the answer among a
    segment's first ``border``). ``streams`` caches the tokenized training documents per corpus."""
    s = R.Settings.from_dict(settings)
    ms = R.method_settings(method, s)
    ms = replace(ms, hmt_steps=-(-rows // ms.hmt_batch))
    if s.corpus not in streams:
        corpus = corpus_of(s)
        documents = corpus.documents()
        if not documents:
            raise ValueError(corpus.missing_message())
        texts = split(documents, 0.15)[0]
        streams[s.corpus] = [t for doc in tokenizer(texts, add_special_tokens=False).input_ids for t in doc]
    data = R.train_dataset(tokenizer, streams[s.corpus], T.Vocab.of(tokenizer), ms,
                           R.hmt_config(method, s, tokenizer_path).num_sensory)
    ends = [(mask.index(1) - 1) % segment_length for mask in data["completion_mask"][:rows]]
    return {"past": sum(e < border for e in ends), "rows": len(ends)}


def _count(side: dict[str, int]) -> str:
    return f"{side['right']} / {side['asked']}"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.question_border", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="JSON", help="long_context.json files scored on the same questions")
    p.add_argument("--tasks-from", required=True, help="a run folder with long_context_tasks/ and tokenizer/")
    p.add_argument("--border-tokens", type=int, default=8,
                   help="a question ends past a border when its last token is among a segment's first N (default 8)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="one method for every run, or one per run (default: each run's only HMT method)")
    p.add_argument("--training-rows", type=int, default=0,
                   help="also count how many of each adapter's first N training rows end past a border (default 0)")
    O.add_output_arguments(p)
    return p


def run_label(path: str) -> str:
    """A run's name in the table and the plot: its folder for a ``long_context.json``, else the file's stem."""
    p = Path(path)
    return (p.parent.name or str(p)) if p.name == "long_context.json" else p.stem


def run_rows(path: str, method: Optional[str]) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """(method, its result rows, the run's stored settings) of one long_context.json."""
    payload = read_run(path)
    method, rows = method_rows(payload, path, method)
    return method, rows, payload["settings"]


def main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    tasks_from = Path(args.tasks_from)
    if not (tasks_from / "long_context_tasks").is_dir() or not (tasks_from / "tokenizer").is_dir():
        print(f"--tasks-from {tasks_from}: no long_context_tasks/ and tokenizer/ there; pass a folder that "
              "benchmarks.long_context wrote (its --output-dir).", file=sys.stderr)
        return 2
    if args.methods is not None and len(args.methods) not in (1, len(args.runs)):
        print(f"--methods takes one method or one per run ({len(args.runs)}), got {len(args.methods)}.",
              file=sys.stderr)
        return 2
    if args.border_tokens < 1 or args.training_rows < 0:
        print(f"--border-tokens must be >= 1 and --training-rows >= 0, got {args.border_tokens} and "
              f"{args.training_rows}.", file=sys.stderr)
        return 2
    methods = [None] * len(args.runs) if args.methods is None else (
        args.methods * len(args.runs) if len(args.methods) == 1 else args.methods)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tasks_from / "tokenizer")
    payload: dict[str, Any] = {"command": O.quoted_command("PYTHONPATH=. python -m benchmarks.question_border", argv),
                               "tasks_from": str(tasks_from), "border_tokens": args.border_tokens, "runs": []}
    cells: dict[int, dict] = {}  # per segment length
    streams: dict[str, list[int]] = {}  # per corpus
    try:
        for path, method in zip(args.runs, methods):
            method, rows, settings = run_rows(path, method)
            segment_length = int(settings["segment_length"])
            if segment_length not in cells:
                cells[segment_length] = question_ends(tokenizer, tasks_from / "long_context_tasks", segment_length)
            entry = {"path": path, "label": run_label(path), "method": method,
                     "cells": split_run(rows, cells[segment_length], args.border_tokens, path)}
            if args.training_rows:
                entry["training_rows"] = training_row_ends(tokenizer, str(tasks_from / "tokenizer"), settings, method,
                                                           args.training_rows, args.border_tokens, segment_length,
                                                           streams)
            payload["runs"].append(entry)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    lines = ["| run | tokens | past a border: right / asked | the rest | needle in the last segment: past / rest |",
             "|---|---:|---:|---:|---:|"]
    for run in payload["runs"]:
        for c in run["cells"]:
            lines.append(f"| {run['label']} | {c['context_tokens']} | {_count(c['past'])} | {_count(c['rest'])} | "
                         f"{_count(c['past_in_window'])} ; {_count(c['rest_in_window'])} |")
    lines += [f"{run['label']}: {run['training_rows']['past']} of its first {run['training_rows']['rows']} training "
              "rows end past a border" for run in payload["runs"] if "training_rows" in run]
    print("\n".join(lines))
    O.write_result(O.output_dir(args), "question_border", payload, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
