"""Where does a trained adapter's recall look, and does the memory of the needle's segment hold the key?

    PYTHONPATH=. python -m benchmarks.recall_diagnostics --run-dir benchmarks/output/lc-austen-s0 \\
        --backbone-cache benchmarks/output/backbones --methods hmt_write hmt_write_gate_spread

reads the ``long_context.json`` and ``adapters/<method>/`` that `benchmarks.long_context` wrote into ``--run-dir``,
reloads that run's frozen backbone and tokenizer from ``--backbone-cache`` (the same corpus, seed and pretraining
settings), and for needle examples of ``--length`` tokens (the needle planted in every segment in turn, on
held-out text) measures, per method:

* **recall at the question**: the recall weights of the LAST segment (the one that asks the question) over the
  cached memories, through `hmt_adapter.engine.memory.observe_recall`: the weight on the needle's segment, the rank of that
  segment, and where the largest weight falls (by segment index), against the uniform weight ``1 / N``;
* **key in memory**: a linear probe (multinomial logistic regression, trained on half of the examples, scored on
  the other half) from the memory embedding ``e_j`` of the needle's segment ``j`` to the key, against the same
  probe on the memory of a segment without the needle (chance 1 / keys);
* **answer**: whether the model's argmax over the key candidates is right, by needle segment, and split by whether
  recall's argmax is the needle's segment (``accuracy_recall_found`` / ``accuracy_recall_missed``): a run that
  answers right when recall finds the needle and wrong otherwise fails at recall, not at what the memory holds.
  With a null slot in recall (``HMTConfig.recall_null``) the weights over the memories sum to less than one; the
  rest, read as m_0, is each segment's ``null_weight``.

With ``--in-window N`` the examples are instead the N needles inside the last segment of `benchmarks.long_context`'s
in-window probe (the question's own window holds the answer): there recall has nothing to find, and the summary says
how confident the read at the question was when the answer came out right and when wrong, and the weight on a null
slot; ``--without-null`` scores an adapter trained with a null slot (``HMTConfig.recall_null``) without it.

With ``--at-init`` each adapter is also inspected as its training started (its saved config, fresh initial
weights): whether the memory holds the key before any training, which is what a write token that starts from text
(`HMTConfig.write_token_init_text`) changes.

Writes ``recall_diagnostics.json`` and ``recall_diagnostics.png`` (recall weight on the needle's segment and probe
accuracy, by the needle's segment, one line per method) into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import peft
import torch
from tqdm import tqdm

import hmt_adapter  # noqa: F401  (registers HMT with PEFT)
from benchmarks.lab import output as O
from benchmarks.lab import tasks as T
from benchmarks.lab.pretrain import prepare
from benchmarks.lab.settings import RetrievalSettings, quick_retrieval
from hmt_adapter.engine.memory import observe_recall
from hmt_adapter.inference.streaming import HMTStreamer


def needle_start(ids: list[int], marker: list[int]) -> int:
    """Index of the first token of ``marker`` (the needle's opening words) in ``ids``."""
    for i in range(len(ids) - len(marker) + 1):
        if ids[i : i + len(marker)] == marker:
            return i
    raise ValueError("needle not found in the tokenized context")


@torch.no_grad()
def inspect(model, tokenizer, examples: list[dict[str, Any]], segment_length: int) -> list[dict[str, Any]]:
    """Per example: needle segment, recall weights of the last segment, memories, answer correctness."""
    marker = tokenizer(" The secret word is", add_special_tokens=False).input_ids
    out = []
    for e in tqdm(examples, desc="examples", unit="ex", leave=False, disable=None):
        ids = tokenizer(e["context"], add_special_tokens=False).input_ids
        segment = needle_start(ids, marker) // segment_length
        weights: list[torch.Tensor] = []
        with observe_recall(weights.append):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        streamer = HMTStreamer(model)
        state = streamer.init_state(1)
        _, state = streamer.feed(torch.tensor([ids]), state, return_logits=False)
        memories = torch.stack([v[0] for v in state.cache.values])  # (segments written, d)
        cands = [tokenizer(c, add_special_tokens=False).input_ids[0] for c in e["choices"]]
        guess = max(range(len(cands)), key=lambda i: logits[cands[i]].item())
        out.append({"segment": segment, "segments": -(-len(ids) // segment_length), "answer": e["answer"],
                    "correct": guess == e["answer"], "last_recall": weights[-1][0] if weights else None,
                    "memories": memories})
    return out


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, classes: int, seed: int = 0) -> float:
    """Held-out accuracy of a multinomial logistic regression (half train, half test) on standardised features."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    train, test = order[: len(order) // 2], order[len(order) // 2 :]
    mean, std = features[train].mean(0), features[train].std(0).clamp_min(1e-6)
    x = (features - mean) / std
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    optim = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(x[train] @ w + b, labels[train]) + 1e-3 * w.pow(2).sum()
        optim.zero_grad()
        loss.backward()
        optim.step()
    return ((x[test] @ w + b).argmax(-1) == labels[test]).float().mean().item()


def summarise(rows: list[dict[str, Any]], keys: int) -> dict[str, Any]:
    by_segment: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_segment.setdefault(r["segment"], []).append(r)
    per_segment = []
    for seg, rs in sorted(by_segment.items()):
        recalls = [r["last_recall"] for r in rs if r["last_recall"] is not None and seg < len(r["last_recall"])]
        weight = [float(w[seg]) for w in recalls]
        rank1 = [int(w.argmax()) == seg for w in recalls]
        per_segment.append({"segment": seg, "n": len(rs), "accuracy": sum(r["correct"] for r in rs) / len(rs),
                            "recall_weight": sum(weight) / len(weight) if weight else None,
                            "uniform_weight": sum(1 / len(w) for w in recalls) / len(recalls) if recalls else None,
                            "recall_top1": sum(rank1) / len(rank1) if rank1 else None,
                            # the weight on recall's null slot (HMTConfig.recall_null; 0 without one): reads m_0
                            "null_weight": _mean_null(r for r in rs if r["last_recall"] is not None)})
    recalled = [(r, int(r["last_recall"].argmax())) for r in rows if r["last_recall"] is not None]
    argmax_segments = [top for _, top in recalled]
    # the answer when recall's argmax is the needle's segment vs when it is another: a recall miss or a read miss
    found = [r for r, top in recalled if top == r["segment"]]
    missed = [r for r, top in recalled if top != r["segment"]]
    # memory of the needle's segment vs memory of a segment without the needle (the one after it, or before)
    labels = torch.tensor([r["answer"] for r in rows])
    with_own = [r for r in rows if r["segment"] < len(r["memories"])]  # a needle in an unfinished last segment: none
    own = torch.stack([r["memories"][r["segment"]] for r in with_own]) if with_own else None
    other = torch.stack([r["memories"][r["segment"] - 1 if r["segment"] > 0 else 1] for r in rows])
    return {
        "per_segment": per_segment,
        "recall_argmax_histogram": {str(s): argmax_segments.count(s) for s in sorted(set(argmax_segments))},
        "probe_needle_segment": (None if own is None
                                 else probe_accuracy(own, torch.tensor([r["answer"] for r in with_own]), keys)),
        "probe_other_segment": probe_accuracy(other, labels, keys),
        "chance": 1 / keys,
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        "recall_found": len(found) / (len(found) + len(missed)) if found or missed else None,
        "accuracy_recall_found": sum(r["correct"] for r in found) / len(found) if found else None,
        "accuracy_recall_missed": sum(r["correct"] for r in missed) / len(missed) if missed else None,
        # recall's null slot (0 without one): its mean weight at the question, over every needle position and with
        # the needle inside the last segment (where reading m_0 is what do-no-harm asks)
        "null_weight": _mean_null(r for r, _ in recalled),
        "null_weight_in_window": _mean_null(r for r, _ in recalled if r["segment"] == r["segments"] - 1),
        # how confident the read at the question was: the largest weight on one memory, right vs wrong answers
        "top_weight_right": _mean(float(r["last_recall"].max()) for r, _ in recalled if r["correct"]),
        "top_weight_wrong": _mean(float(r["last_recall"].max()) for r, _ in recalled if not r["correct"]),
        "confident_reads_right": sum(bool(r["last_recall"].max() > CONFIDENT) for r, _ in recalled if r["correct"]),
        "confident_reads_wrong": sum(bool(r["last_recall"].max() > CONFIDENT) for r, _ in recalled if not r["correct"]),
        # every question's read, for the in-window plot: its top memory weight, the null slot's share, the answer
        "reads": [{"top_weight": float(r["last_recall"].max()), "null_weight": _null_share(r["last_recall"]),
                   "correct": bool(r["correct"])} for r, _ in recalled],
    }


CONFIDENT = 0.8  # a read is "confident" when one memory holds more than this share of the recall weight


def _mean(values) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def _null_share(recall: torch.Tensor) -> float:
    """The null slot's share of one read: what the weights over the memories leave of 1 (not below 0 by rounding)."""
    return max(0.0, 1 - float(recall.sum()))


def _mean_null(rows) -> Optional[float]:
    return _mean(_null_share(r["last_recall"]) for r in rows)


def fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}"


PLOT_BINS = 32  # at most about this many points per line: one example per segment of a 16k context is all noise


def bin_width(segments: int, bins: int = PLOT_BINS) -> int:
    """Consecutive segments per plotted point."""
    return max(1, segments // bins)


def binned(per_segment: list[dict[str, Any]], bins: int = PLOT_BINS) -> tuple[list[float], list[float], list[float]]:
    """(segment, recall weight on the needle, accuracy), example-weighted means over `bin_width` consecutive
    segments."""
    step = bin_width(len(per_segment), bins)
    out: tuple[list[float], list[float], list[float]] = ([], [], [])
    for i in range(0, len(per_segment), step):
        group = per_segment[i : i + step]
        n = sum(p["n"] for p in group)
        out[0].append(sum(p["segment"] for p in group) / len(group))
        out[1].append(sum((p["recall_weight"] or 0) * p["n"] for p in group) / n)
        out[2].append(sum(p["accuracy"] * p["n"] for p in group) / n)
    return out


def plot_in_window(payload: dict[str, Any], path: Path) -> None:
    """``--in-window``: every question's read, right and wrong answers apart: the largest weight on one memory
    (a confident read sits above `CONFIDENT`) and the null slot's share."""
    plt = O.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    methods = list(payload["methods"].items())
    for i, (method, res) in enumerate(methods):
        for key, ax in zip(("top_weight", "null_weight"), axes):
            for correct, colour, shift in ((True, "tab:green", -0.12), (False, "tab:red", 0.12)):
                ys = [r[key] for r in res["reads"] if r["correct"] == correct]
                ax.scatter([i + shift] * len(ys), ys, color=colour, alpha=0.6, s=22,
                           label=("right" if correct else "wrong") if i == 0 else None)
    axes[0].axhline(CONFIDENT, color="k", ls="--", lw=1)
    axes[0].set_title(f"top memory's recall weight (dashed: {CONFIDENT})", fontsize=10)
    axes[1].set_title("null slot's weight", fontsize=10)
    for ax in axes:
        ax.set_xticks(range(len(methods)), [m.replace("hmt_write_init_", "") for m, _ in methods], fontsize=7)
        ax.set_xlim(-0.5, len(methods) - 0.5)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("at the question")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    null = " (scored without the null slot)" if payload.get("without_null") else ""
    fig.suptitle(f"{payload['corpus']} seed {payload['seed']}, {payload['length']} tokens, "
                 f"{payload['in_window']} needles in the last segment{null}")
    O.save_figure(fig, path)


def plot(payload: dict[str, Any], path: Path) -> None:
    if payload.get("in_window"):
        return plot_in_window(payload, path)
    plt = O.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for method, res in payload["methods"].items():
        segs, weight, accuracy = binned(res["per_segment"])
        axes[0].plot(segs, weight, marker="o", label=method)
        axes[1].plot(segs, accuracy, marker="o", label=method)
    uniform = next(iter(payload["methods"].values()))["per_segment"]
    axes[0].plot([p["segment"] for p in uniform], [p["uniform_weight"] or 0 for p in uniform], "k--", lw=1,
                 label="uniform")
    step = bin_width(len(uniform))
    where = f" (means over bins of {step} segments)" if step > 1 else ""
    axes[0].set_title("last segment's recall weight\non the needle's memory", fontsize=10)
    axes[1].set_title("needle accuracy\nby the needle's segment", fontsize=10)
    for ax in axes:
        ax.set_xlabel("segment holding the needle")
        ax.set_ylim(0, 1.02)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{payload['corpus']} seed {payload['seed']}, {payload['length']} tokens{where}")
    O.save_figure(fig, path)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recall_diagnostics", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="an --output-dir of benchmarks.long_context (with adapters/)")
    p.add_argument("--backbone-cache", required=True, help="the --backbone-cache that run used")
    p.add_argument("--methods", nargs="+", default=None, help="adapters to inspect (default: all in adapters/)")
    p.add_argument("--length", type=int, default=1024, help="context tokens of the examples")
    p.add_argument("--per-segment", type=int, default=12, help="examples with the needle in each segment")
    p.add_argument("--corpus", default=None, help="with --seed: the run's corpus when it wrote no JSON (--quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--in-window", type=int, default=0, metavar="N",
                   help="instead of a needle in every segment: N needles inside the last segment, the examples of "
                        "benchmarks.long_context's in-window probe (--needle-offsets spread --needle-depths 1) at "
                        "--length, with how confident the read at the question was, right vs wrong answers")
    p.add_argument("--without-null", action="store_true",
                   help="score adapters trained with a null slot (HMTConfig.recall_null) without it: does the "
                        "answer depend on what the slot reads?")
    p.add_argument("--at-init", action="store_true",
                   help="also inspect each adapter as training started it: its saved config, fresh initial weights")
    O.add_output_arguments(p)
    return p


def run_settings(found: list[Path], args: argparse.Namespace) -> RetrievalSettings:
    """The backbone settings of the run: from its JSON (``found``), else the ``--quick`` backbone of ``--corpus`` and
    ``--seed``; with ``--backbone-cache``."""
    if found:
        s = RetrievalSettings.from_dict(json.loads(found[0].read_text())["settings"])
    else:
        s = quick_retrieval(corpus=args.corpus, seed=args.seed)
    return replace(s, backbone_cache=args.backbone_cache)


def needle_examples(prep, length: int, per_segment: int, segment_length: int) -> list[dict[str, Any]]:
    """``per_segment`` needle examples of ``length`` tokens (held-out text) with the needle in each segment in turn."""
    segments = length // segment_length
    rng = random.Random(7)
    examples = []
    for seg in range(segments):
        for _ in range(per_segment):  # needle at a random place inside segment `seg`
            depth = (seg + 0.1 + 0.6 * rng.random()) / segments
            examples.append(T.needle_example(prep.tokenizer, prep.heldout_stream, prep.vocab, length, depth, rng))
    return examples


def fresh_adapter(backbone, adapter_dir: Path, seed: int):
    """The adapter saved in ``adapter_dir`` as its training started: the same config, initial weights drawn as the
    long-context run draws them for its ``seed`` (``torch.manual_seed(seed + 31)``; a run's ``--hmt-seed`` is not
    read back)."""
    from hmt_adapter import HMTConfig

    config = HMTConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = False  # as created for training (a write token that starts from text needs this)
    torch.manual_seed(seed + 31)
    return peft.get_peft_model(backbone, config)


def main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    if args.in_window < 0:
        print(f"--in-window must be >= 1 example (0: a needle in every segment), got {args.in_window}.", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir)
    found = [run_dir / n for n in ("long_context.json", "long_context_partial.json") if (run_dir / n).is_file()]
    if not (run_dir / "adapters").is_dir() or (not found and args.corpus is None):
        print(f"{run_dir} holds no adapters/ and long_context.json: pass the --output-dir of a long_context run "
              f"(or --corpus/--seed for a --quick run that stopped before writing its JSON).", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    s = run_settings(found, args)
    prep = prepare(s, lambda msg: print(msg, file=sys.stderr))
    if args.in_window:
        examples = T.make_examples("needle", prep.tokenizer, prep.heldout_stream, prep.vocab, args.length,
                                   args.in_window, s.seed, segment_length=s.segment_length, depths=(1.0,))
    else:
        examples = needle_examples(prep, args.length, args.per_segment, s.segment_length)
    methods = args.methods or sorted(d.name for d in (run_dir / "adapters").iterdir())
    results = {}
    for method in methods:
        adapters = [(method, lambda: peft.PeftModel.from_pretrained(prep.backbone, run_dir / "adapters" / method))]
        if args.at_init:
            adapters.append((f"{method} (at init)", lambda: fresh_adapter(prep.backbone, run_dir / "adapters" / method,
                                                                          s.seed)))
        for name, build in adapters:
            model = build().eval()
            if args.without_null:  # read at every forward (`HMTModel.runner`): a scoring diagnostic
                model.peft_config[model.active_adapter].recall_null = False
            results[name] = summarise(inspect(model, prep.tokenizer, examples, s.segment_length), len(prep.vocab.keys))
            r = results[name]
            print(f"{name}: accuracy {r['accuracy']:.2f}; recall's argmax on the needle's segment "
                  f"{fmt(r['recall_found'])} (accuracy then {fmt(r['accuracy_recall_found'])}, otherwise "
                  f"{fmt(r['accuracy_recall_missed'])}); probe (needle segment) {fmt(r['probe_needle_segment'])} "
                  f"vs other {r['probe_other_segment']:.2f}; null slot weight {fmt(r['null_weight'])} "
                  f"(needle in the last segment: {fmt(r['null_weight_in_window'])}); top memory weight at the question "
                  f"{fmt(r['top_weight_right'])} when right, {fmt(r['top_weight_wrong'])} when wrong; reads above "
                  f"{CONFIDENT}: {r['confident_reads_right']} right, {r['confident_reads_wrong']} wrong", flush=True)
            prep.backbone = model.unload()
    payload = {"command": O.command_line("benchmarks.recall_diagnostics"), "corpus": s.corpus, "seed": s.seed,
               "length": args.length, "in_window": args.in_window, "without_null": args.without_null,
               "run_dir": str(run_dir), "methods": results}
    O.write_result(O.output_dir(args), "recall_diagnostics", payload, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
