"""Eager HMT against compiled HMT (`hmt_adapter.compile`), the backbone over windows and full attention (issue 10).

For each thread count, in a fresh process (inductor bakes the thread count into its kernels), four ways of reading
the same ``segments x L`` tokens are timed round-robin (so load from other processes hits all of them alike):

* ``windows``: the backbone over independent windows of ``L`` tokens;
* ``hmt``: the HMT adapter, eager;
* ``hmt_compiled``: the same model after ``hmt_adapter.compile(model)`` (inductor; compile time is not timed: it
  happens in the warm-up runs);
* ``full``: the backbone with full attention over the whole input.

Inference: no grad, logits for every token. Training: forward + backward with the causal-LM loss on every token,
gradient to the HMT parameters (backbone frozen) or, for the backbone columns, to its input embeddings. Each
figure is the median of ``--repeats`` timed rounds after ``--warmup`` untimed ones. "HMT vs limit" is
``HMT tok/s / (windows tok/s / limit)`` with ``limit = 1 + summary_fraction + (num_sensory + 2) / L``, the
positions HMT's backbone sees per window token. Targets: eager >= 1.05 of the limit; compiled inference >= 1.2x
eager.

Commands (from the repository root):

    PYTHONPATH=. python -m benchmarks.compile                          # Llama 4 x 256, vocab 128, 1 and 2 threads
    PYTHONPATH=. python -m benchmarks.compile --vocab 32000 --tag v32000
    PYTHONPATH=. python -m benchmarks.compile --segments 4 --repeats 1 --threads 1   # smoke run

Writes (to ``--output-dir``, default benchmarks/output; ``--update-results``: benchmarks/results) ``compile[-TAG].json``
and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

import torch

import hmt_adapter
from benchmarks.lab import backbone as B
from benchmarks.lab import measure as M
from benchmarks.lab import output as O

MODULE = "benchmarks.compile"
NAMES = ("windows", "hmt", "hmt_compiled", "full")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    O.add_output_arguments(p)
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch thread counts, one process each")
    p.add_argument("--modes", nargs="+", default=["inference", "training"], choices=["inference", "training"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--segments", type=int, default=16, help="input length in segments")
    p.add_argument("--segment-length", type=int, default=240)
    p.add_argument("--num-sensory", type=int, default=32)
    p.add_argument("--summary-fraction", type=float, default=0.5)
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds (the first one compiles)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # internal: one thread count
    return p


def limit_ratio(args: argparse.Namespace) -> float:
    """Backbone positions HMT runs per window token: summary pass, sensory and the two memory slots."""
    return 1 + args.summary_fraction + (args.num_sensory + 2) / args.segment_length


def _with_compiled(hmt, cases: dict[str, Callable[[], Any]]) -> dict[str, Callable[[], Any]]:
    """Add ``hmt_compiled``: the ``hmt`` case with the compiled segment step switched on for the call."""
    def toggled(fn: Callable[[], Any], enabled: bool) -> Callable[[], Any]:
        def run():
            hmt.base_model.hmt_compiled_step = compiled if enabled else None
            return fn()

        return run

    compiled = hmt_adapter.compile(hmt).base_model.hmt_compiled_step
    out = {"windows": cases["windows"], "hmt": toggled(cases["hmt"], False), "hmt_compiled": toggled(cases["hmt"], True)}
    if "full" in cases:
        out["full"] = cases["full"]
    return out


def worker(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every mode at ``args.worker`` threads, in this process."""
    torch.set_num_threads(args.worker)
    limit = limit_ratio(args)
    size = B.Size(f"h{args.hidden}-l{args.layers}", args.hidden, args.layers, args.vocab)
    total = args.segments * args.segment_length
    base = B.build_backbone(size, args.device, max_positions=max(8192, total))
    hmt = B.attach_hmt(base, args.segment_length, args.num_sensory, args.summary_fraction)
    ids = torch.randint(4, args.vocab, (args.batch, total), generator=torch.Generator().manual_seed(0)).to(args.device)
    rows = []
    for mode in args.modes:
        hmt.train(mode == "training")
        base.train(mode == "training")
        build = M.inference_cases if mode == "inference" else M.training_cases
        cases = _with_compiled(hmt, build(base, hmt, ids, args.segment_length, True))
        timings = M.time_interleaved(cases, args.device, args.warmup, args.repeats)
        row = {"size": size.name, "vocab": args.vocab, "threads": args.worker, "batch": args.batch, "mode": mode,
               "tokens": ids.numel(), "limit": limit}
        for name, t in timings.items():
            row[name] = dict(t, tokens_per_s=ids.numel() / t["median_s"])
        for name in ("hmt", "hmt_compiled"):
            row[name]["vs_limit"] = row[name]["tokens_per_s"] * limit / row["windows"]["tokens_per_s"]
        row["compiled_speedup"] = row["hmt_compiled"]["tokens_per_s"] / row["hmt"]["tokens_per_s"]
        rows.append(row)
    return rows


def format_row(row: dict[str, Any]) -> str:
    cols = [f"{row['size']} V={row['vocab']} threads={row['threads']} {row['mode']:9s}"]
    cols += [f"{name} {row[name]['tokens_per_s']:7.0f} tok/s" for name in NAMES]
    cols.append(f"eager vs limit {row['hmt']['vs_limit']:.2f}, compiled vs limit {row['hmt_compiled']['vs_limit']:.2f}")
    cols.append(f"compiled/eager {row['compiled_speedup']:.2f} (limit {row['limit']:.3f})")
    return " | ".join(cols)


def plot(rows: list[dict[str, Any]], path) -> None:
    O.plot_rate_bars(rows, path, names=lambda sel: list(NAMES), reference=lambda r: r["windows"]["tokens_per_s"] / r["limit"],
                     reference_label="windows / limit", reference_at="hmt", tick=lambda r: f"{r['threads']} thread(s)",
                     title=lambda mode, sel: f"{mode} ({sel[0]['size']}, vocab {sel[0]['vocab']})")


def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return
    rows = []
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for threads in args.threads:
        result = M.run_worker(MODULE, [*passthrough, "--worker", str(threads)], timeout=3600)
        for row in result:
            print(format_row(row), flush=True)
        rows += result
    name = "compile" + (f"-{args.tag}" if args.tag else "")
    O.save_results(MODULE, name, args, {"rows": rows}, lambda png: plot(rows, png))


if __name__ == "__main__":
    main()
