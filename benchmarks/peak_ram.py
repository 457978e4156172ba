"""Peak RAM of an HMT training step vs input length, with and without gradient checkpointing; and the peak-RAM
effect of TRL's fused LM-head path and of ``logits_to_keep`` (issue 5). ("Memory" in the library is HMT's memory;
this benchmark measures the process's RAM, or on CUDA the device memory the allocator hands out.)

Every configuration runs in a fresh Python process (``--worker``), so its peak resident set size (VmHWM) is
its own. The figure reported is the step's peak above the resident size just before the step (model and
inputs already built), ``step_peak_mib``; the raw process peak is stored too. On CUDA the same fields hold
``torch.cuda.max_memory_allocated`` figures instead of RSS.

Sweep (a training step: HMT forward + backward, backbone frozen, fused LM-head loss as TRL computes it)
over 4..64 segments, checkpointing off and on; then, at ``--compare-segments`` segments, the loss paths:

* ``train-logits``: ``model(input_ids, labels=...)`` returning (B, T, V) logits, then backward;
* ``train-fused``: ``model(input_ids, labels=..., fused_lm_head=True)`` (TRL), then backward;
* ``infer-logits``: no grad, logits of every token; ``infer-keep1``: no grad, ``logits_to_keep=1``.

Commands (from the repository root):

    PYTHONPATH=. python -m benchmarks.peak_ram                 # CPU, fp32, 2 threads (~10 min)
    PYTHONPATH=. python -m benchmarks.peak_ram --segments 4 8 --compare-segments 4   # smoke run
    PYTHONPATH=. python -m benchmarks.peak_ram --device cuda --dtype bf16 --threads 0 --tag cuda-bf16

Writes (to ``--output-dir``, default benchmarks/output; ``--update-results``: benchmarks/results) ``peak_ram[-TAG].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from benchmarks.lab import backbone as B
from benchmarks.lab import measure as M
from benchmarks.lab import output as O

MODULE = "benchmarks.peak_ram"
PATHS = ("train-fused", "train-logits", "infer-logits", "infer-keep1")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    O.add_output_arguments(p)
    p.add_argument("--size", default="h256-l4", choices=sorted(B.SIZES))
    p.add_argument("--segments", nargs="+", type=int, default=[4, 8, 16, 32, 64])
    p.add_argument("--compare-segments", type=int, default=16, help="input length of the loss-path comparison")
    p.add_argument("--segment-length", type=int, default=256)
    p.add_argument("--num-sensory", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--four-bit", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="")
    M.add_stock_malloc_argument(p)
    # worker mode (one configuration in this process)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", default="train-fused", choices=PATHS, help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=4, help=argparse.SUPPRESS)
    return p


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, then measure one step's peak memory above the resident size before it."""
    size = B.SIZES[args.size]
    base = B.build_backbone(size, args.device, B.parse_dtype(args.dtype), args.four_bit,
                            max_positions=max(4096, args.segment_length + args.num_sensory + 2))
    if args.checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = B.attach_hmt(base, args.segment_length, args.num_sensory, 0.5)
    ids = torch.randint(4, size.vocab, (args.batch, args.n * args.segment_length), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    if args.path.startswith("train"):
        model.train()
    else:
        model.eval()
    before, reset_ok = M.step_memory_start(args.device)
    if args.path == "train-fused":
        model(input_ids=ids, labels=ids, fused_lm_head=True).loss.backward()
    elif args.path == "train-logits":
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        del out
    else:
        with torch.no_grad():
            model(input_ids=ids, logits_to_keep=1 if args.path == "infer-keep1" else 0)
    peak = M.step_memory_peak(args.device)
    return {
        "segments": args.n,
        "checkpointing": bool(args.checkpointing),
        "path": args.path,
        "before_mib": before,
        "peak_mib": peak,
        "step_peak_mib": peak - before,
        "peak_reset": reset_ok,
    }


def _worker_args(args: argparse.Namespace, n: int, checkpointing: bool, path: str) -> list[str]:
    out = ["--worker", "--size", args.size, "--segment-length", str(args.segment_length),
           "--num-sensory", str(args.num_sensory), "--batch", str(args.batch), "--device", args.device,
           "--dtype", args.dtype, "--threads", str(args.threads), "--n", str(n),
           "--checkpointing", str(int(checkpointing)), "--path", path]
    return out + (["--four-bit"] if args.four_bit else [])


def _env(args: argparse.Namespace) -> dict[str, str]:
    return M.malloc_env(args.stock_malloc, args.device)


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for checkpointing in (False, True):
        for n in args.segments:
            row = M.run_worker(MODULE, _worker_args(args, n, checkpointing, "train-fused"), extra_env=_env(args))
            rows.append(row)
            print(f"train-fused  segments={n:3d} checkpointing={checkpointing!s:5s} "
                  f"step peak {row['step_peak_mib']:8.1f} MiB (process peak {row['peak_mib']:.0f})", flush=True)
    compare = []
    for path in PATHS:
        row = M.run_worker(MODULE, _worker_args(args, args.compare_segments, False, path), extra_env=_env(args))
        compare.append(row)
        print(f"{path:12s} segments={args.compare_segments:3d} step peak {row['step_peak_mib']:8.1f} MiB", flush=True)
    growth = {}
    for checkpointing in (False, True):
        sel = sorted((r for r in rows if r["checkpointing"] == checkpointing), key=lambda r: r["segments"])
        if len(sel) >= 2:  # least-squares slope, MiB per extra segment
            xs = [r["segments"] for r in sel]
            ys = [r["step_peak_mib"] for r in sel]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            growth["checkpointing" if checkpointing else "no_checkpointing"] = slope
    if len(growth) == 2:
        print(f"growth per extra segment: {growth['no_checkpointing']:.1f} MiB without checkpointing, "
              f"{growth['checkpointing']:.1f} MiB with ({growth['checkpointing'] / growth['no_checkpointing']:.1%})")
    return {"sweep": rows, "compare": compare, "growth_mib_per_segment": growth}


def plot(result: dict[str, Any], path) -> None:
    plt = O.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for checkpointing, style in ((False, "o-"), (True, "s-")):
        sel = sorted((r for r in result["sweep"] if r["checkpointing"] == checkpointing), key=lambda r: r["segments"])
        ax1.plot([r["segments"] for r in sel], [r["step_peak_mib"] for r in sel], style,
                 label="gradient checkpointing" if checkpointing else "no checkpointing")
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("input length (segments)")
    ax1.set_ylabel("training-step peak above pre-step RSS (MiB)")
    ax1.set_title("HMT training step (fused LM-head loss)")
    ax1.legend()
    comp = result["compare"]
    ax2.bar([r["path"] for r in comp], [r["step_peak_mib"] for r in comp], color=["C0", "C1", "C2", "C3"])
    ax2.set_ylabel("step peak above pre-step RSS (MiB)")
    ax2.set_title(f"loss / logits paths at {comp[0]['segments']} segments" if comp else "")
    O.save_figure(fig, path)


def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    result = sweep(args)
    name = "peak_ram" + (f"-{args.tag}" if args.tag else "")
    O.save_results(MODULE, name, args, result, lambda png: plot(result, png))


if __name__ == "__main__":
    main()
