"""Needle and fact retrieval in real text at real distances, evaluated through lm-evaluation-harness.

    apt-get install -y python3-doc      # the corpus: the Python documentation's reST sources (Debian)
    apt-get install -y --no-install-recommends r-cran-janeaustenr      # the second corpus (--corpus austen)
    pip install -c constraints-cpu.txt -e ".[test]"
    PYTHONPATH=. python -m benchmarks.long_context --quick            # over an hour on one CPU thread (see --help)
    PYTHONPATH=. python -m benchmarks.long_context                     # the full protocol (hours on a CPU)

Protocol: a BPE tokenizer and a small Llama are trained on SHORT windows (``segment_length`` tokens) of the
corpus's training documents, with in-window episodes of the tasks mixed in (so the backbone can answer when the
evidence is inside its window); the backbone is then frozen. Each HMT variant is trained with TRL's SFTTrainer on
episodes of 2..``max_train_segments`` segments (answer-only loss unless ``--all-token-loss``), then every method
is scored through lm-eval (`hmt_adapter.integrations.lm_eval.HMTLM` for HMT; lm-eval's own ``HFLM`` with ``max_length`` = HMT's
window for the sliding-window baseline, which keeps the last tokens of the context) on the same held-out examples:
needle at several lengths and depths, BABILong-style facts (qa1, qa2). Answers are single tokens scored by
log-likelihood over the candidate set (lm-eval ``multiple_choice``); chance is 1 / candidates.

Methods (``METHOD_SPECS``): ``hmt_write_init_null_decoy_border_spread_stable`` (the recipe of ``--quick``, 2000
steps, training rows of up to 32 segments: learned write token started from the question's last token, facts spread
over every segment, a quarter inside the last one and half of those with a decoy key beyond the window, half the
rows ending the question just past a segment border, a null slot in recall, clipped gradients, cosine rate),
``hmt_write_init_null_decoy_spread_stable`` (the recipe before, of the headline sweep: the same without the border
rows, run with rows of up to 16 segments), ``hmt_write_init_spread_stable`` (without the decoys and the slot), its
ablations and screens (``hmt`` is the paper's layout, ``hmt_write_lora*`` HMT + LoRA, ``hmt_write_no_recall`` the
paper's stage 1, ``hmt_write_init_logn_spread_stable`` the ln N recall scale,
``hmt_write_init_null_alldecoy_spread_stable`` a decoy in every in-window row, ...), and ``sliding_window`` (the
backbone alone). Writes ``long_context.json`` (``command``, ``chance``,
``results`` rows of task/method/context_tokens/depth/accuracy/n) and PNGs (needle heatmap per method, accuracy by
length) to ``--output-dir`` (default benchmarks/output; ``--update-results``: benchmarks/results).

The held-out needles sit at depths 0 / 25 / 50 / 75 / 100%; every length is a multiple of the segment, so on this
grid all keys of one depth share one offset inside their segment (at 25% the key opens a segment). ``--needle-offsets
spread`` keeps each depth's segment and draws the key's offset inside it. A finished run's saved adapters are scored
on another grid without training again:

    PYTHONPATH=. python -m benchmarks.long_context --adapters-from benchmarks/output/lc16-austen-s0 \
        --needle-offsets spread --output-dir benchmarks/output/lc16-austen-s0-spread

A run's cell is a rate over its questions: 20 at 64k resolve 80% only to 58-92% (the 95% Wilson interval that the
per-run rows of ``--combine`` print beside each cell). To tell whether a run clears a bar, or whether a lever moved
it, score the saved adapters on more questions, the same ones for every method (~21 min per run on one thread):

    PYTHONPATH=. python -m benchmarks.long_context --adapters-from benchmarks/output/lc16-austen-s0 \
        --needle-offsets spread --needle-lengths 16384 65536 --examples 100 --examples-longest 100 --facts-tasks \
        --output-dir benchmarks/output/lc16-austen-s0-n100

Two runs scored on the same questions (the same corpus, seed and grid) are compared question by question: how many
each answered that the other missed, and the exact McNemar p-value of the difference (runs scored before the
per-question ``outcomes`` were recorded must be scored again):

    PYTHONPATH=. python -m benchmarks.long_context --compare RUN_A/long_context.json RUN_B/long_context.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from benchmarks.lab import output as O
from benchmarks.lab import tasks as T
from benchmarks.lab.corpus import CORPORA
from benchmarks.lab.pretrain import PRETRAIN_TASKS, Prepared, check_episode_settings, corpus_problem, prepare
from benchmarks.lab.retrieval import METHODS, Settings, quick, train_method
from benchmarks.lab.runs import BACKBONE_IN_WINDOW, method_rows, read_run


# ---- evaluation ------------------------------------------------------------------------------------------
def evaluate(lm, task_names: list[str], task_dir: Path) -> list[dict[str, Any]]:
    """Per-sample accuracy of ``lm`` on the local tasks, through lm-eval's simple_evaluate: one row per question,
    with its lm-eval ``doc_id`` and `benchmarks.lab.tasks.question_digest`."""
    import lm_eval  # here: lm-eval is optional (the [eval] extra), needed only when a run evaluates
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=task_names, task_manager=TaskManager(include_path=str(task_dir)),
                                  log_samples=True, verbosity="ERROR")
    rows = []
    for name, samples in out["samples"].items():
        for sample in samples:
            rows.append({"task_name": name, "depth": sample["doc"]["depth"], "length": sample["doc"]["length"],
                         "acc": float(sample["acc"]), "doc_id": int(sample["doc_id"]),
                         "question": T.question_digest(sample["doc"])})
    return rows


def aggregate(method: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result row per task, length and depth. Besides ``accuracy`` and ``n`` it keeps the per-question record
    that paired comparisons need: ``outcomes`` ("1" right, "0" wrong, in lm-eval's doc order) and ``questions``, a
    digest of the questions asked, equal only for the same questions in the same order."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        task = r["task_name"].rsplit("_", 1)[0].removeprefix("lc_")
        groups.setdefault((task, r["length"], r["depth"]), []).append(r)
    out = []
    for (t, n, d), v in sorted(groups.items()):
        v = sorted(v, key=lambda r: r["doc_id"])
        out.append({"task": t, "method": method, "context_tokens": n, "depth": d,
                    "accuracy": sum(r["acc"] for r in v) / len(v), "n": len(v),
                    "outcomes": "".join("1" if r["acc"] else "0" for r in v),
                    "questions": T.questions_digest([r["question"] for r in v])})
    return out


# ---- the run ---------------------------------------------------------------------------------------------
def write_tasks(s: Settings, prep: Prepared, task_dir: Path) -> tuple[list[str], dict[str, float], list[str]]:
    """Write every lm-eval task of the run (held-out text) into ``task_dir``: returns (the tasks at real lengths,
    chance per task, the in-window probes: examples that fit in one segment)."""
    check_evaluation(s)
    names, chance = [], {}
    for task, lengths in (("needle", s.needle_lengths), *((t, s.facts_lengths) for t in s.facts_tasks)):
        for n in lengths:
            count = s.examples_longest if n == max(lengths) else s.examples
            count = count if task == "needle" else min(count, s.facts_examples)
            spread = s.needle_offsets == "spread" and task == "needle"
            examples = T.make_examples(task, prep.tokenizer, prep.heldout_stream, prep.vocab, n, count, s.seed,
                                       segment_length=s.segment_length if spread else 0,
                                       depths=s.needle_depths if task == "needle" else T.DEPTHS)
            T.write_task(task_dir, f"lc_{task}_{n}", examples)
            names.append(f"lc_{task}_{n}")
            chance[task] = T.chance(examples)
    in_window = [f"lc_{t}_{s.segment_length}" for t in ("needle", "facts_qa1")]
    for t in ("needle", "facts_qa1"):
        T.write_task(task_dir, f"lc_{t}_{s.segment_length}", T.make_examples(
            t, prep.tokenizer, prep.heldout_stream, prep.vocab, s.segment_length - 2, s.examples, s.seed + 5))
    return names, chance, in_window


def check_evaluation(s: Settings) -> None:
    """ValueError for evaluation settings that cannot be scored (before anything is trained or loaded)."""
    if s.needle_offsets not in ("depth", "spread"):
        raise ValueError(f"needle_offsets must be 'depth' or 'spread', got {s.needle_offsets!r}.")
    T.check_depths(s.needle_depths)
    if s.facts_tasks and s.facts_examples < 1:
        raise ValueError(f"facts_examples must be >= 1 per length of each facts task, got {s.facts_examples}.")
    if s.eval_recall_window < 0:
        raise ValueError(f"eval_recall_window must be >= 1 memory (0: the adapter's own), got {s.eval_recall_window}.")
    if s.eval_recall_sharpen_beyond < 0 or s.eval_recall_sharpen_beyond == 1:
        raise ValueError(f"eval_recall_sharpen_beyond must be >= 2 memories (0: the adapter's own), got "
                         f"{s.eval_recall_sharpen_beyond}.")


def window_lm(backbone, tokenizer, max_length: int):
    """lm-eval's HFLM over ``backbone`` (the sliding-window baseline: it keeps the last ``max_length`` tokens of a
    context), tokenizing each long context once for all its choices."""
    from lm_eval.models.huggingface import HFLM  # here: lm-eval is optional (the [eval] extra)

    from hmt_adapter.integrations.lm_eval import EncodingCache

    class WindowLM(EncodingCache, HFLM):
        pass

    return WindowLM(pretrained=backbone, tokenizer=tokenizer, batch_size=1, max_length=max_length)


def hmt_lm(model, tokenizer):
    """`hmt_adapter.integrations.lm_eval.HMTLM` over an HMT model."""
    from hmt_adapter.integrations.lm_eval import HMTLM  # here: it imports lm-eval, which is optional

    return HMTLM(pretrained=model, tokenizer=tokenizer, batch_size=1)


def saved_adapter(backbone, run_dir: Path, method: str):
    """The adapter that the run in ``run_dir`` trained for ``method`` (``adapters/<method>/``), on ``backbone``."""
    import peft

    path = run_dir / "adapters" / method
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"{run_dir} holds no adapter for {method!r} (no {path}/adapter_config.json); its adapters: "
                         f"{sorted(d.name for d in (run_dir / 'adapters').glob('*'))}.")
    return peft.PeftModel.from_pretrained(backbone, path).eval()


def run(s: Settings, command: str, out_dir: Path, adapters_from: Optional[Path] = None) -> dict[str, Any]:
    """Train every HMT method of ``s`` (or, with ``adapters_from``, load the adapters that run saved and keep its
    training losses), score every method on the held-out tasks, and write the JSON and PNGs into ``out_dir``."""
    start = time.perf_counter()
    log = O.logger(start)
    source = json.loads((adapters_from / "long_context.json").read_text()) if adapters_from else None
    prep = prepare(s, log)
    task_dir = out_dir / "long_context_tasks"
    names, chance, in_window = write_tasks(s, prep, task_dir)

    results: list[dict[str, Any]] = []
    train_logs, gates = {}, {}
    window = s.segment_length + s.num_sensory
    backbone_lm = window_lm(prep.backbone, prep.tokenizer, window)
    in_window_rows = aggregate("backbone_in_window", evaluate(backbone_lm, in_window, task_dir))
    log(f"backbone with the evidence inside its window: {_summary(in_window_rows)}")
    if "sliding_window" in s.methods:
        results += aggregate("sliding_window", evaluate(backbone_lm, names, task_dir))
        log(f"sliding_window ({window} tokens): {_summary(results)}")
    backbone, stream = prep.backbone, prep.train_stream.tolist()
    for method in [m for m in s.methods if m != "sliding_window"]:
        if source is not None:
            model, gate = saved_adapter(backbone, adapters_from, method), source.get("memory_gate", {}).get(method)
            train_logs[method] = source["hmt_train_loss"][method]
        else:
            model, train_logs[method], gate = train_method(method, backbone, prep, stream, s, out_dir)
        if gate is not None:
            gates[method] = gate
        if s.eval_recall_window > 0:  # read at every forward (`HMTModel.runner`): scoring only, training is done
            model.peft_config[model.active_adapter].recall_window = s.eval_recall_window
        if s.eval_recall_sharpen_beyond > 0:  # read at every forward too: an inference-only change of the adapter
            model.peft_config[model.active_adapter].recall_sharpen_beyond = s.eval_recall_sharpen_beyond
        rows = aggregate(method, evaluate(hmt_lm(model, prep.tokenizer), names, task_dir))
        results += rows
        log(f"{method}: loss {train_logs[method][0]:.2f} -> {train_logs[method][-1]:.2f}; {_summary(rows)}")
        backbone = model.unload()  # the bare (frozen) backbone again for the next variant
        _write_partial(out_dir, s, results, train_logs)  # a run stopped later keeps what it measured

    for r in results + in_window_rows:
        r.update(corpus=s.corpus, seed=s.seed)
    payload = {"command": command, "machine": O.machine_info("cpu"), "settings": asdict(s), "chance": chance,
               **({"adapters_from": str(adapters_from), "source_command": source["command"]} if source else {}),
               "backbone_in_window": in_window_rows, "pretraining": prep.pretraining, "hmt_train_loss": train_logs,
               "memory_gate": gates, "results": results, "seconds": time.perf_counter() - start}
    path = O.write_json(out_dir / "long_context.json", payload)
    plot(payload, out_dir)
    log(f"wrote {path} and long_context_*.png")
    return payload


def _write_partial(out_dir: Path, s: Settings, results: list[dict[str, Any]], train_logs: dict) -> None:
    rows = [dict(r, corpus=s.corpus, seed=s.seed) for r in results]
    O.write_json(out_dir / "long_context_partial.json", {"settings": asdict(s), "results": rows,
                                                          "hmt_train_loss": train_logs})


def _summary(rows: list[dict[str, Any]]) -> str:
    """``task@length: accuracy% (right/asked, 95% interval)`` per task and length of one run's rows."""
    parts = []
    for task, length in dict.fromkeys((r["task"], r["context_tokens"]) for r in rows):
        right, asked = run_counts(rows, task, length)
        low, high = wilson_interval(right, asked)
        parts.append(f"{task}@{length}: {100 * right / asked:.0f}% ({right}/{asked}, {100 * low:.0f}-{100 * high:.0f})")
    return ", ".join(parts)


def wilson_interval(right: int, asked: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a rate of ``right`` answers out of ``asked`` questions (95% for z = 1.96): the
    range of true accuracies that this many questions cannot tell apart from the one measured. Unlike the normal
    approximation it stays inside [0, 1] and is not empty at 0 or ``asked`` right."""
    if asked < 1 or not 0 <= right <= asked:
        raise ValueError(f"wilson_interval needs 0 <= right <= asked and asked >= 1, got {right} of {asked}.")
    rate, z2 = right / asked, z * z
    centre = (rate + z2 / (2 * asked)) / (1 + z2 / asked)
    half = z * math.sqrt(rate * (1 - rate) / asked + z2 / (4 * asked * asked)) / (1 + z2 / asked)
    return max(0.0, centre - half), min(1.0, centre + half)




# ---- figures -----------------------------------------------------------------------------------------------
def plot(payload: dict[str, Any], out_dir: Path) -> None:
    """``long_context_needle.png`` (accuracy by length x depth, one heatmap per method) and
    ``long_context_by_length.png`` (accuracy by length, one panel per task)."""
    plot_needle(payload, out_dir / "long_context_needle.png")
    plot_by_length(payload, out_dir / "long_context_by_length.png")


def panel_title(method: str, width: int = 34) -> str:
    """A heatmap panel's title: a method name longer than ``width`` broken after an underscore, and the run
    (`` (worst: seed 0)``) on a line of its own, so the title fits a 3-inch panel."""
    name, _, run = method.partition(" (")
    lines, line = [], ""
    for part in name.split("_"):
        if line and len(line) + 1 + len(part) > width:
            lines, line = lines + [line + "_"], part
        else:
            line = f"{line}_{part}" if line else part
    return "\n".join(lines + [line] + ([f"({run}"] if run else []))


def plot_needle(payload: dict[str, Any], path: Path) -> None:
    """Needle heatmaps: accuracy by length x depth, one per method."""
    plt = O.pyplot()
    rows = payload["results"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    needle = [r for r in rows if r["task"] == "needle"]
    lengths = sorted({r["context_tokens"] for r in needle})
    depths = sorted({r["depth"] for r in needle})
    ncols = min(4, len(methods))
    nrows = -(-len(methods) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    for ax, method in zip(axes.flat, methods):
        grid = torch.full((len(depths), len(lengths)), float("nan"))
        for r in needle:
            if r["method"] == method:
                grid[depths.index(r["depth"]), lengths.index(r["context_tokens"])] = r["accuracy"]
        ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for (i, j), value in np.ndenumerate(grid.numpy()):
            if value == value:  # not NaN
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" if n >= 1024 else str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{int(100 * d)}%" for d in depths])
        ax.set_title(panel_title(method), fontsize=8)
        ax.set_xlabel("context tokens")
    for row in axes:
        row[0].set_ylabel("needle depth")
    fig.suptitle(f"needle accuracy (chance {100 * payload['chance']['needle']:.0f}%)")
    O.save_figure(fig, path)


def plot_by_length(payload: dict[str, Any], path: Path) -> None:
    """Accuracy by context length (all depths), one line per method and one panel per task."""
    plt = O.pyplot()
    rows = payload["results"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in methods:
            pts: dict[int, list[float]] = {}
            for r in rows:
                if r["task"] == task and r["method"] == method:
                    pts.setdefault(r["context_tokens"], []).extend([r["accuracy"]] * r["n"])
            xs = sorted(pts)
            ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], marker="o", label=panel_title(method))
        ax.axhline(payload["chance"][task], color="grey", ls="--", lw=1, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_title(task)
        ax.set_xlabel("context tokens")
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3))  # below: panels keep their width
    O.save_figure(fig, path)


def plot_from(paths: list[str], out_dir: Path) -> None:
    """The heatmaps and curves of several runs' ``long_context.json`` files together (same tasks, same examples)."""
    payloads = [json.loads(Path(p).read_text()) for p in paths]
    rows, seen = [], set()
    for payload in payloads:  # a method run again with other settings (e.g. more steps) gets its own panel
        names = {r["method"] for r in payload["results"]}
        rename = {m: f"{m} ({payload['settings']['hmt_steps']} steps)" for m in names & seen}
        rows += [dict(r, method=rename.get(r["method"], r["method"])) for r in payload["results"]]
        seen |= names
    plot({"chance": payloads[0]["chance"], "results": rows}, out_dir)


# ---- several runs as one result (corpora x seeds) ---------------------------------------------------------
def run_counts(rows: list[dict[str, Any]], task: str, length: int, depth: Optional[float] = None) -> tuple[int, int]:
    """(right, asked): the questions of one run's rows of ``task`` at ``length`` (all depths, or one)."""
    picked = [r for r in rows if r["task"] == task and r["context_tokens"] == length
              and (depth is None or r["depth"] == depth)]
    return round(sum(r["accuracy"] * r["n"] for r in picked)), sum(r["n"] for r in picked)


def run_accuracy(rows: list[dict[str, Any]], task: str, length: int, depth: Optional[float] = None) -> float:
    """Accuracy of one run's rows of ``task`` at ``length`` (all depths, or one)."""
    right, asked = run_counts(rows, task, length, depth)
    return right / max(1, asked)


def with_interval(rows: list[dict[str, Any]], task: str, length: int) -> str:
    """A per-run cell: accuracy % and its 95% Wilson interval, ``80 (58-92)`` for 16 of 20."""
    right, asked = run_counts(rows, task, length)
    low, high = wilson_interval(right, asked)
    return f"{100 * right / asked:.0f} ({100 * low:.0f}-{100 * high:.0f})"


#: The needle lengths of the summary's columns (a run that scored fewer leaves its other cells empty).
LENGTHS = (1024, 4096, 16384, 65536)

SUMMARY_HEADER = ["| corpus | method | runs (seeds) | needle 1k | 4k | 16k | 64k "
                  "| depth 100% (in window) 1k / 4k / 16k / 64k | facts qa1 1k | 4k |",
                  "|---|---|---|---|---|---|---|---|---|---|"]


def summarise_method(rows: list[dict[str, Any]], corpus: str, method: str) -> dict[str, Any]:
    """One method on one corpus over its runs (seeds): the worst run (lowest mean needle accuracy over lengths), the
    mean and worst needle accuracy at every length, the worst in-window (depth 100%) accuracy and facts_qa1's."""
    seeds = sorted({r["seed"] for r in rows if r["corpus"] == corpus and r["method"] == method})
    per_seed = {sd: [r for r in rows if r["corpus"] == corpus and r["method"] == method and r["seed"] == sd]
                for sd in seeds}
    lengths = sorted({r["context_tokens"] for r in rows if r["task"] == "needle"})
    score = {sd: sum(run_accuracy(rs, "needle", n) for n in lengths) / len(lengths) for sd, rs in per_seed.items()}
    worst = min(seeds, key=lambda sd: score[sd])
    cells = {}
    for n in lengths:
        accs = [run_accuracy(per_seed[sd], "needle", n) for sd in seeds]
        cells[n] = {"mean": sum(accs) / len(accs), "worst": min(accs), "runs": accs}
    in_window = {n: min(run_accuracy(per_seed[sd], "needle", n, 1.0) for sd in seeds) for n in lengths}
    facts = {n: [run_accuracy(per_seed[sd], "facts_qa1", n) for sd in seeds]
             for n in sorted({r["context_tokens"] for r in rows if r["task"] == "facts_qa1"})}
    return {"seeds": seeds, "worst_seed": worst, "needle": cells, "worst_depth100": in_window, "facts_qa1": facts}


def summary_line(corpus: str, method: str, entry: dict[str, Any]) -> str:
    """The row of ``long_context_summary.md`` of one `summarise_method` entry."""
    seeds, cells, in_window, facts = entry["seeds"], entry["needle"], entry["worst_depth100"], entry["facts_qa1"]
    fmt = lambda c: f"{100 * c['mean']:.0f} (worst {100 * c['worst']:.0f})"  # noqa: E731
    return (f"| {corpus} | {method} | {len(seeds)} ({', '.join(map(str, seeds))}) | "
            + " | ".join(fmt(cells[n]) if n in cells else "" for n in LENGTHS)
            + " | " + " / ".join(f"{100 * in_window[n]:.0f}" if n in in_window else "-" for n in LENGTHS)
            + " | " + " | ".join(f"{100 * sum(facts[n]) / len(facts[n]):.0f}" if n in facts else ""
                                 for n in (1024, 4096)) + " |")


PER_RUN_HEADER = ["| corpus | seed | method | needle 1k (95% interval) | 4k | 16k | 64k "
                  "| depth 100% (in window) 1k / 4k / 16k / 64k | facts qa1 1k / 4k | train loss (first -> last logged) |",
                  "|---|---:|---|---:|---:|---:|---:|---|---|---|"]


def per_run_lines(runs: list[dict[str, Any]]) -> list[str]:
    """One markdown row per run and method: needle accuracy by length with its 95% Wilson interval (what the run's
    number of questions resolves), at depth 100%, qa1, and the training loss."""
    lines = list(PER_RUN_HEADER)
    for run in sorted(runs, key=lambda r: (r["settings"]["corpus"], r["settings"]["seed"])):
        corpus, seed = run["settings"]["corpus"], run["settings"]["seed"]
        for method in dict.fromkeys(r["method"] for r in run["results"]):
            rows = [r for r in run["results"] if r["method"] == method]
            scored = {r["context_tokens"] for r in rows if r["task"] == "needle"}
            losses = run["hmt_train_loss"].get(method)
            loss = f"{losses[0]:.2f} -> {losses[-1]:.2f}" if losses else ""
            lines.append(f"| {corpus} | {seed} | {method} | "  # a length the run did not score: an empty cell
                         + " | ".join(with_interval(rows, "needle", n) if n in scored else "" for n in LENGTHS)
                         + " | " + " / ".join(f"{100 * run_accuracy(rows, 'needle', n, 1.0):.0f}" if n in scored
                                              else "-" for n in LENGTHS)
                         + " | " + " / ".join(f"{100 * run_accuracy(rows, 'facts_qa1', n):.0f}" for n in (1024, 4096)
                                              if any(r["task"] == "facts_qa1" and r["context_tokens"] == n for r in rows))
                         + f" | {loss} |")
    return lines


def combine(paths: list[str], out_dir: Path) -> dict[str, Any]:
    """Several runs (one ``long_context.json`` per corpus and seed) as one result file: every row with its
    ``corpus`` and ``seed``, and per corpus and method the worst and the mean run at every needle length (the
    worst run is the one with the lowest mean needle accuracy over lengths). Writes ``long_context.json``,
    ``long_context_summary.md`` and, per corpus, the needle heatmaps of the worst run of every method."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    grids = {run["settings"].get("needle_offsets", "depth") for run in runs}
    if len(grids) > 1:
        raise ValueError(f"These runs scored different needle grids (needle_offsets {sorted(grids)}); combine the "
                         "runs of one grid at a time.")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for run in runs for r in run["results"]]
    summary: dict[str, dict[str, Any]] = {}
    lines = list(SUMMARY_HEADER)
    for corpus in sorted({r["corpus"] for r in rows}):
        for method in dict.fromkeys(r["method"] for r in rows if r["corpus"] == corpus):
            summary.setdefault(corpus, {})[method] = summarise_method(rows, corpus, method)
            lines.append(summary_line(corpus, method, summary[corpus][method]))
    payload = {"runs": [{"command": run["command"], "corpus": run["settings"]["corpus"], "seed": run["settings"]["seed"],
                         "seconds": run["seconds"], "hmt_train_loss": run["hmt_train_loss"],
                         "memory_gate": run.get("memory_gate", {}), "backbone_in_window": run["backbone_in_window"],
                         "settings": run["settings"]} for run in runs],
               "chance": runs[0]["chance"], "summary": summary, "results": rows}
    O.write_json(out_dir / "long_context.json", payload)
    (out_dir / "long_context_summary.md").write_text(
        "Needle accuracy, % (mean over runs, worst run in brackets); depth 100% = the needle inside the last "
        "segment, worst run per length.\n\n" + "\n".join(lines) + "\n\nEvery run (needle and qa1 accuracy, %):\n\n"
        + "\n".join(per_run_lines(runs)) + "\n")
    for corpus, methods in summary.items():  # the heatmap of each method's worst run on this corpus
        worst_rows = [r for r in rows if r["corpus"] == corpus and r["seed"] == methods[r["method"]]["worst_seed"]]
        worst_rows = [dict(r, method=f"{r['method']} (worst: seed {r['seed']})") for r in worst_rows]
        worst = {"chance": runs[0]["chance"], "results": worst_rows}
        plot_needle(worst, out_dir / f"long_context_{corpus}_worst_needle.png")
        plot_by_length(worst, out_dir / f"long_context_{corpus}_worst_by_length.png")
    return payload


# ---- two runs on the same questions (paired) --------------------------------------------------------------
def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar test: a binomial test on the discordant questions (right in one run only). The
    probability that two methods of equal accuracy split ``only_a + only_b`` such questions at least this unevenly;
    1.0 when there are none."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"mcnemar_p needs counts >= 0, got {only_a} and {only_b}.")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare_runs(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two runs' answers to the same questions, per task and length (all depths both scored): questions asked, right
    in each, right in only one (``only_a``, ``only_b``) and the exact McNemar p-value of the difference. Raises
    ValueError for rows without per-question outcomes or for cells that asked other questions."""
    cells_b = {(r["task"], r["context_tokens"], r["depth"]): r for r in rows_b}
    pairs: dict[tuple[str, int], list[tuple[str, str]]] = {}  # per task and length: (A's, B's) outcome per question
    for a in rows_a:
        key = (a["task"], a["context_tokens"], a["depth"])
        if key not in cells_b:
            continue
        b = cells_b[key]
        if "outcomes" not in a or "outcomes" not in b:
            raise ValueError("a result row without per-question outcomes (a run scored before they were recorded); "
                             "score its adapters again with --adapters-from.")
        if a["questions"] != b["questions"]:
            raise ValueError(f"{a['task']} at {a['context_tokens']} tokens, depth {a['depth']:.0%}: the two runs asked "
                             "different questions; score both with the same corpus, seed, --needle-offsets, "
                             "--examples and --examples-longest.")
        pairs.setdefault((a["task"], a["context_tokens"]), []).extend(zip(a["outcomes"], b["outcomes"]))
    if not pairs:
        raise ValueError("the two runs share no task, length and depth.")
    rows = []
    for (task, n), both in sorted(pairs.items()):
        only_a, only_b = both.count(("1", "0")), both.count(("0", "1"))
        rows.append({"task": task, "context_tokens": n, "asked": len(both),
                     "right_a": sum(x == "1" for x, _ in both), "right_b": sum(y == "1" for _, y in both),
                     "only_a": only_a, "only_b": only_b, "p": mcnemar_p(only_a, only_b)})
    return rows


def compare(paths: list[str], methods: Optional[list[str]], out_dir: Path) -> dict[str, Any]:
    """``--compare A B``: the paired comparison of two runs (`compare_runs`), printed as a table and written to
    ``long_context_compare.json``. ``methods``: none (each run's only HMT method), one (both) or two (A's, B's)."""
    if methods is not None and len(methods) > 2:
        raise ValueError(f"--compare takes one method for both runs or one per run, got {len(methods)}.")
    names: list[Optional[str]] = [None, None]
    if methods:
        names = list(methods) * 2 if len(methods) == 1 else list(methods)
    sides = []
    for path, method in zip(paths, names):
        sides.append(method_rows(read_run(path, "--compare"), path, method))
    rows = compare_runs(sides[0][1], sides[1][1])
    lines = [f"A: {paths[0]} ({sides[0][0]})", f"B: {paths[1]} ({sides[1][0]})", "",
             "| task | tokens | asked | A right | B right | only A | only B | McNemar p |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['context_tokens']} | {r['asked']} | {r['right_a']} | {r['right_b']} | {r['only_a']} "
              f"| {r['only_b']} | {r['p']:.3g} |" for r in rows]
    print("\n".join(lines))
    payload = {"a": {"path": paths[0], "method": sides[0][0]}, "b": {"path": paths[1], "method": sides[1][0]},
               "results": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    O.write_json(out_dir / "long_context_compare.json", payload)
    return payload


# ---- command line ------------------------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.long_context", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the recipe's run: small backbone, needles at 1k-64k, training rows of up to 32 segments, half "
                        "ending the question past a segment border (a run of this recipe took 71-80 min on one "
                        "thread to train and score 100 questions at 16k and 64k; --quick itself was not timed)")
    p.add_argument("--corpus", default=None,
                   help=f"one of {sorted(CORPORA)} (see benchmarks/lab/corpus.py for the install command of each; "
                        "default python-docs)")
    p.add_argument("--corpus-dir", default=None, help="read the corpus from this directory instead")
    p.add_argument("--backbone-cache", default=None, metavar="DIR",
                   help="reuse (or store) the pretrained backbone and tokenizer of this corpus/seed/settings here")
    p.add_argument("--placement", choices=("depth", "segment"), default=None,
                   help="training facts at a uniform token depth, or in a uniformly drawn segment")
    p.add_argument("--in-window-fraction", type=float, default=None,
                   help="share of HMT training episodes with the fact inside the last segment")
    p.add_argument("--min-train-segments", type=int, default=None)
    p.add_argument("--needle-lengths", type=int, nargs="+", default=None)
    p.add_argument("--facts-lengths", type=int, nargs="+", default=None)
    p.add_argument("--facts-tasks", nargs="*", default=None, choices=("facts_qa1", "facts_qa2"),
                   help="the facts tasks scored (none: needle only)")
    p.add_argument("--needle-depths", type=float, nargs="+", default=None,
                   help="held-out needles' relative depths, in turn (default 0 0.25 0.5 0.75 1)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--methods", nargs="+", default=None, choices=(*METHODS, BACKBONE_IN_WINDOW),
                   help=f"the methods to train and score; with --compare, the method of both runs or of each "
                        f"({BACKBONE_IN_WINDOW}: their backbones' in-window answers)")
    p.add_argument("--hmt-steps", type=int, default=None)
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--pretrain-lr", type=float, default=None)
    p.add_argument("--pretrain-batch", type=int, default=None, help="windows per pretraining step (16)")
    p.add_argument("--pretrain-weight-decay", type=float, default=None, help="AdamW's weight decay in pretraining (0.1)")
    p.add_argument("--episode-fraction", type=float, default=None, help="share of pretraining windows that are episodes")
    p.add_argument("--pretrain-schedule", choices=("constant", "cosine"), default=None,
                   help="the pretraining lr after warm-up: constant (the default) or cosine to 10%% at the last step")
    p.add_argument("--drill-people", type=int, default=None,
                   help="people in a facts_qa1_dense drill window (3): more make the name, not recency, decide")
    p.add_argument("--drill-stale-share", type=float, default=None,
                   help="share of a drill's questions about the person named longest ago (0): answers far back")
    p.add_argument("--drill-filler-share", type=float, default=None,
                   help="share of a drill's sentences that are a few tokens of corpus text (0): questions apart from facts")
    p.add_argument("--drill-hard-after", type=float, default=None, metavar="ACC",
                   help="stale questions, filler and spread in drills only once the two-fact probe reaches ACC "
                        "(0: at once)")
    p.add_argument("--drill-spread", type=int, default=None, metavar="N",
                   help="drills as episodes of 1..N moves and a question, the answer 1..N facts back with equal odds "
                        "(0: off)")
    p.add_argument("--drill-question-share", type=float, default=None,
                   help="share of a drill's sentences that are questions (0.5): less puts more moves before each")
    p.add_argument("--hidden-size", type=int, default=None)
    p.add_argument("--num-layers", type=int, default=None)
    p.add_argument("--num-heads", type=int, default=None)
    p.add_argument("--max-train-segments", type=int, default=None)
    p.add_argument("--target-qa1-in-window", type=float, default=None,
                   help="pretraining also runs until the backbone answers this share of in-window qa1 questions")
    p.add_argument("--pretrain-tasks", nargs="+", default=None, choices=PRETRAIN_TASKS,
                   help="the tasks of pretraining's in-window episodes, drawn uniformly (repeat one to weight it); "
                        "facts_qa1_dense: a whole window of qa1 drill without filler, several answers")
    p.add_argument("--pretrain-tasks-bound", nargs="+", default=None, choices=PRETRAIN_TASKS,
                   help="the tasks of pretraining's episodes once the two-fact probe reaches 90%% (the binding; "
                        "default: --pretrain-tasks throughout)")
    p.add_argument("--pretrain-min-facts", type=int, default=None, metavar="N",
                   help="pretraining's facts episodes have N..6 facts, drawn uniformly (default 6: as the held-out "
                        "tasks)")
    p.add_argument("--train-tasks", nargs="+", default=None, choices=("needle", "facts_qa1", "facts_qa2"),
                   help="the tasks of HMT's training episodes, drawn uniformly (default: needle only)")
    p.add_argument("--answer-weight", type=float, default=None, help="pretraining: extra CE weight on episode answers")
    p.add_argument("--hmt-batch", type=int, default=None)
    p.add_argument("--hmt-lr", type=float, default=None)
    p.add_argument("--curriculum-ramp-fraction", type=float, default=None,
                   help="share of the steps over which the longest training input grows to the maximum (0.5)")
    p.add_argument("--no-curriculum", action="store_true", help="draw every training input's length uniformly")
    p.add_argument("--evidence", choices=("beyond", "anywhere"), default=None,
                   help="where HMT's training episodes put the supporting fact")
    p.add_argument("--examples", type=int, default=None, help="examples per length (and per in-window probe)")
    p.add_argument("--examples-longest", type=int, default=None, help="examples at the longest length")
    p.add_argument("--facts-examples", type=int, default=None,
                   help="at most this many examples per length of each facts task (--quick: 20)")
    p.add_argument("--recall-query", choices=("segment", "previous"), default=None)
    p.add_argument("--all-token-loss", action="store_true", help="train HMT on every token, not only the answer")
    p.add_argument("--seed", type=int, default=None, help="seed of the backbone, its data and the examples (0)")
    p.add_argument("--hmt-seed", type=int, default=None,
                   help="seed of the adapter's initial weights and training draws (default: --seed)")
    p.add_argument("--needle-offsets", choices=("depth", "spread"), default=None,
                   help="held-out needles: the key's offset in its segment follows from the depth (the grid of every "
                        "earlier row), or is drawn uniformly inside the segment the depth picks")
    p.add_argument("--eval-recall-window", type=int, default=None, metavar="N",
                   help="score with recall over only the last N memories (a diagnostic; default: the adapter's own)")
    p.add_argument("--eval-recall-sharpen-beyond", type=int, default=None, metavar="K",
                   help="score with HMTConfig.recall_sharpen_beyond=K (recall scores times ln N / ln K beyond K "
                        "memories; default: the adapter's own)")
    p.add_argument("--adapters-from", default=None, metavar="RUN_DIR",
                   help="score the adapters that this finished run (an --output-dir) saved instead of training, with "
                        "its settings; only evaluation options may be given with it")
    p.add_argument("--plot-from", nargs="+", default=None, metavar="JSON",
                   help="draw the PNGs from these result files (their rows side by side) instead of running")
    p.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                   help="merge these runs' long_context.json (corpora x seeds) into one result with worst/mean rows")
    p.add_argument("--compare", nargs=2, default=None, metavar="JSON",
                   help="compare two runs' long_context.json on the questions both asked, paired (McNemar); "
                        "--methods picks the method of both, or of each")
    O.add_output_arguments(p)
    return p


#: Command-line options that set the `Settings` field of the same name when given.
OVERRIDES = ("corpus_dir", "backbone_cache", "placement", "in_window_fraction", "min_train_segments", "threads",
             "hmt_steps", "pretrain_steps", "max_train_segments", "recall_query", "pretrain_lr", "episode_fraction",
             "hidden_size", "num_layers", "answer_weight", "hmt_batch", "hmt_lr", "evidence", "examples",
             "examples_longest", "facts_examples", "hmt_seed", "target_qa1_in_window", "pretrain_min_facts",
             "curriculum_ramp_fraction", "needle_offsets", "eval_recall_window", "eval_recall_sharpen_beyond",
             "pretrain_batch", "pretrain_weight_decay", "num_heads", "drill_people", "drill_question_share",
             "pretrain_schedule", "drill_stale_share", "drill_filler_share", "drill_hard_after", "drill_spread")

#: What may be given with ``--adapters-from`` (the rest would change the backbone, the adapters or their training).
RESCORE_OPTIONS = ("backbone_cache", "threads", "needle_offsets", "methods", "examples", "examples_longest",
                   "needle_lengths", "needle_depths", "facts_tasks", "eval_recall_window", "eval_recall_sharpen_beyond")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The run's settings: the full protocol or ``--quick``'s, with the options given on the command line."""
    overrides: dict[str, Any] = {"corpus": args.corpus or "python-docs", "seed": args.seed or 0}
    overrides.update({key: getattr(args, key) for key in OVERRIDES if getattr(args, key) is not None})
    if args.methods:
        overrides["methods"] = tuple(args.methods)
    for key in ("needle_lengths", "facts_lengths", "pretrain_tasks", "pretrain_tasks_bound", "train_tasks",
                "needle_depths"):
        if getattr(args, key):
            overrides[key] = tuple(getattr(args, key))
    if args.facts_tasks is not None:
        overrides["facts_tasks"] = tuple(args.facts_tasks)
    if args.all_token_loss:
        overrides["answer_only_loss"] = False
    if args.no_curriculum:
        overrides["curriculum"] = False
    return quick(**overrides) if args.quick else replace(Settings(), **overrides)


def settings_of_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """``--adapters-from``: the finished run's settings, with the evaluation options given on the command line.
    Raises ValueError for a folder without a finished run, or an option that would change what was trained."""
    run_dir = Path(args.adapters_from)
    if not (run_dir / "long_context.json").is_file():
        raise ValueError(f"--adapters-from {run_dir}: no long_context.json there; pass the --output-dir of a finished "
                         "benchmarks.long_context run.")
    given = [a.dest for a in parser._actions if a.dest not in (*RESCORE_OPTIONS, "adapters_from", "help", "output_dir",
             "update_results") and getattr(args, a.dest) is not None and getattr(args, a.dest) is not False]
    if given:
        raise ValueError(f"--adapters-from scores the run with its own settings; drop "
                         f"{', '.join('--' + g.replace('_', '-') for g in given)}.")
    s = Settings.from_dict(json.loads((run_dir / "long_context.json").read_text())["settings"])
    overrides: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                 for k in RESCORE_OPTIONS if (v := getattr(args, k)) is not None}
    s = replace(s, **overrides)
    for method in (m for m in s.methods if m != "sliding_window"):
        if not (run_dir / "adapters" / method / "adapter_config.json").is_file():
            raise ValueError(f"--adapters-from {run_dir}: no adapter for {method!r} there (adapters/{method}/); "
                             "choose the methods with --methods.")
    return s


def main(argv: Optional[list[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.plot_from:
        plot_from(args.plot_from, O.output_dir(args))
        return 0
    try:
        if args.combine:
            combine(args.combine, O.output_dir(args))
            return 0
        if args.compare:
            compare(args.compare, args.methods, O.output_dir(args))
            return 0
        if args.methods and BACKBONE_IN_WINDOW in args.methods:
            raise ValueError(f"--methods {BACKBONE_IN_WINDOW} names the backbones' in-window rows of two runs: use it "
                             "with --compare.")
        s = settings_of_run(args, parser) if args.adapters_from else settings_from_args(args)
        if args.eval_recall_window is not None and args.eval_recall_window < 1:
            raise ValueError(f"--eval-recall-window must be >= 1 memory, got {args.eval_recall_window}.")
        check_evaluation(s)
        check_episode_settings(s)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    problem = corpus_problem(s)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    O.quiet_torch_run(s.threads)
    run(s, O.quoted_command("PYTHONPATH=. python -m benchmarks.long_context", argv), O.output_dir(args),
        adapters_from=Path(args.adapters_from) if args.adapters_from else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
