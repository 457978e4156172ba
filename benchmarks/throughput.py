"""Throughput of HMT against the same backbone over independent windows and with full attention (issue 5).

For each tiny-Llama size, batch size and mode, three (or four) ways of reading the same ``segments x L`` tokens
are timed round-robin (so load from other processes hits all of them alike):

* ``windows``: the backbone over independent windows of ``L`` tokens, one window of every row per pass;
* ``hmt``: the HMT adapter (``peft.get_peft_model(base, HMTConfig(...))``) over the whole input;
* ``full``: the backbone with full attention over the whole input;
* ``hmt_fused`` (training only): HMT on TRL's fused-LM-head path (``fused_lm_head=True``, no logits).

Inference: no grad, logits for every token on every side. Training: HMT forward+backward with the backbone
frozen (gradient to the HMT parameters), against the frozen backbone with the gradient taken to its input
embeddings (what prompt tuning pays). Each figure is the median of ``--repeats`` timed runs after
``--warmup`` untimed ones. Printed next to each HMT ratio: issue 5's limit
``1 + summary_fraction + (num_sensory + 4) / L`` and the targets (inference >= 1.05, training >= 0.95 of
windows-throughput / limit).

Commands (from the repository root):

    PYTHONPATH=. python -m benchmarks.throughput                       # CPU, fp32, 2 threads (~10 min)
    PYTHONPATH=. python -m benchmarks.throughput --sizes h256-l4 --batch-sizes 1 --repeats 1   # smoke run
    PYTHONPATH=. python -m benchmarks.throughput --device cuda --dtype bf16 --threads 0 --tag cuda-bf16
    PYTHONPATH=. python -m benchmarks.throughput --device cuda --dtype bf16 --four-bit --threads 0 --tag cuda-nf4

Writes (to ``--output-dir``, default benchmarks/output; ``--update-results``: benchmarks/results) ``throughput[-TAG].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.lab import backbone as B
from benchmarks.lab import measure as M
from benchmarks.lab import output as O

MODULE = "benchmarks.throughput"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    O.add_output_arguments(p)
    p.add_argument("--sizes", nargs="+", default=["h256-l4", "h512-l8"], choices=sorted(B.SIZES))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    p.add_argument("--modes", nargs="+", default=["inference", "training"], choices=["inference", "training"])
    p.add_argument("--segments", type=int, default=8, help="input length in segments")
    p.add_argument("--segment-length", type=int, default=478)
    p.add_argument("--num-sensory", type=int, default=32)
    p.add_argument("--summary-fraction", type=float, default=0.5)
    p.add_argument("--no-full", action="store_true", help="skip the full-attention column")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--four-bit", action="store_true", help="load the backbone as a bitsandbytes nf4 model")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--tag", default="", help="suffix of the result files")
    return p


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype = B.parse_dtype(args.dtype)
    limit = M.limit_ratio(args.segment_length, args.num_sensory, args.summary_fraction)
    rows = []
    for size_name in args.sizes:
        size = B.SIZES[size_name]
        base = B.build_backbone(size, args.device, dtype, args.four_bit, max_positions=max(8192, args.segments * args.segment_length))
        hmt = B.attach_hmt(base, args.segment_length, args.num_sensory, args.summary_fraction)
        for batch in args.batch_sizes:
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(4, size.vocab, (batch, args.segments * args.segment_length), generator=gen).to(args.device)
            tokens = ids.numel()
            for mode in args.modes:
                if mode == "inference":
                    hmt.eval()
                    base.eval()
                    cases = M.inference_cases(base, hmt, ids, args.segment_length, not args.no_full)
                else:
                    hmt.train()
                    base.train()
                    cases = M.training_cases(base, hmt, ids, args.segment_length, not args.no_full)
                timings = M.time_interleaved(cases, args.device, args.warmup, args.repeats)
                row = {"size": size_name, "batch": batch, "mode": mode, "tokens": tokens, "limit": limit}
                for name, t in timings.items():
                    row[name] = dict(t, tokens_per_s=tokens / t["median_s"], cpu_tokens_per_s=tokens / t["cpu_median_s"])
                for name in [n for n in timings if n.startswith("hmt")]:
                    # measured HMT throughput relative to (windows throughput / limit); target >= 1.05 / 0.95
                    row[name]["vs_limit"] = row[name]["tokens_per_s"] * limit / row["windows"]["tokens_per_s"]
                    row[name]["cpu_vs_limit"] = row[name]["cpu_tokens_per_s"] * limit / row["windows"]["cpu_tokens_per_s"]
                row["target"] = 1.05 if mode == "inference" else 0.95
                rows.append(row)
                print(format_row(row), flush=True)
        del hmt, base
    return rows


def format_row(row: dict[str, Any]) -> str:
    cols = [f"{row['size']:8s} B={row['batch']} {row['mode']:9s}"]
    for name in ("windows", "hmt", "hmt_fused", "full"):
        if name in row:
            cols.append(f"{name} {row[name]['tokens_per_s']:8.0f} tok/s")
    for name in ("hmt", "hmt_fused"):
        if name in row:
            r = row[name]
            cols.append(f"{name}/(windows/limit) = {r['vs_limit']:.2f} (cpu-time {r['cpu_vs_limit']:.2f})")
    cols.append(f"limit {row['limit']:.3f}, target >= {row['target']:.2f}")
    return " | ".join(cols)


def plot(rows: list[dict[str, Any]], path) -> None:
    O.plot_rate_bars(
        rows, path, names=lambda sel: [n for n in ("windows", "hmt", "hmt_fused", "full") if n in sel[0]],
        reference=lambda r: r["windows"]["tokens_per_s"] / r["limit"] * r["target"], reference_label="HMT target",
        reference_at="hmt", tick=lambda r: f"{r['size']}\nB={r['batch']}", title=lambda mode, sel: mode,
    )


def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = measure(args)
    name = "throughput" + (f"-{args.tag}" if args.tag else "")
    O.save_results(MODULE, name, args, {"rows": rows}, lambda png: plot(rows, png))


if __name__ == "__main__":
    main()
