"""Training at length, side by side (issue 10, part 4): tokens/s and peak memory of one training step of HMT + LoRA
against full-attention LoRA fine-tuning of the same backbone, at 1k..32k tokens per row.

This is the comparison a user makes when choosing between HMT and long-context fine-tuning. Methods (``--methods``):

* ``full-lora``: the backbone with full (sdpa) attention over the whole row, PEFT ``LoraConfig(r, alpha)`` on every
  linear projection (``target_modules="all-linear"``, the LM head excluded), gradient checkpointing on. Llama has no
  chunked loss of its own, so the loss is TRL's fused LM head, as ``SFTTrainer`` patches every model it trains:
  ``trl.trainer.utils.add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))``, then
  ``model(input_ids, labels, fused_lm_head=True)``; no (B, T, V) logits are built.
* ``hmt-lora``: ``HMTConfig(segment_length, num_sensory, lora_r, lora_alpha)`` on the same backbone, gradient
  checkpointing on, the same call (HMT's forward honours ``fused_lm_head=True`` segment by segment).
* ``hmt-frozen``: the same without LoRA (backbone frozen, HMT parameters only).

Both sides compute the loss as ``SFTTrainer.compute_loss`` does: ``-log_probs.sum() / label_mask.sum()`` over every
token of the row. One training step is forward + backward (no optimizer step). Every (method, length) case runs in a
fresh Python process (``--worker``) with glibc's mmap threshold fixed (see ``benchmarks/lab/measure.py``), so its peak
resident size is its own: it builds the model, runs ``--warmup`` untimed steps, then ``--steps`` timed ones, and
reports the median wall time and the step peak (VmHWM reset before each step, minus the resident size before the
step; the largest over all steps, warm-up included). A case that runs past ``--timeout`` seconds is killed and
recorded as timed out, with the steps it finished; a case that fails (e.g. killed for memory) is recorded too.

Commands (from the repository root):

    PYTHONPATH=. python -m benchmarks.train_length                 # CPU, fp32, 1 thread (~20-25 min)
    PYTHONPATH=. python -m benchmarks.train_length --lengths 1024 2048 --timeout 120   # smoke run
    PYTHONPATH=. python -m benchmarks.train_length --device cuda --dtype bf16 --threads 0 --tag cuda-bf16

Writes (to ``--output-dir``, default benchmarks/output; ``--update-results``: benchmarks/results)
``train_length[-TAG].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import peft
import torch
from trl.trainer.utils import add_fused_lm_head

from benchmarks.lab import backbone as B
from benchmarks.lab import measure as M
from benchmarks.lab import output as O

MODULE = "benchmarks.train_length"
METHODS = ("full-lora", "hmt-lora", "hmt-frozen")
LABELS = {"full-lora": "full attention + LoRA", "hmt-lora": "HMT + LoRA", "hmt-frozen": "HMT, frozen backbone"}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    O.add_output_arguments(p)
    p.add_argument("--size", default="h256-l4", help="a name of benchmarks.lab.backbone.SIZES, or hH-lL[-vV] (e.g. h64-l2-v512)")
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384, 32768],
                   help="tokens per row")
    p.add_argument("--methods", nargs="+", default=["full-lora", "hmt-lora"], choices=METHODS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--segment-length", type=int, default=512)
    p.add_argument("--num-sensory", type=int, default=32)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--steps", type=int, default=2, help="timed steps (the median is reported)")
    p.add_argument("--timeout", type=float, default=300, help="seconds before a case is killed and marked timed out")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: leave torch's default)")
    p.add_argument("--tag", default="", help="suffix of the result files")
    M.add_stock_malloc_argument(p)
    # worker mode (one case in this process)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="hmt-lora", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--max-positions", type=int, default=0, help=argparse.SUPPRESS)
    return p


def parse_size(name: str) -> B.Size:
    """``benchmarks.lab.backbone.SIZES[name]``, or a size spelt ``hH-lL`` / ``hH-lL-vV`` (hidden, layers, vocab)."""
    if name in B.SIZES:
        return B.SIZES[name]
    match = re.fullmatch(r"h(\d+)-l(\d+)(?:-v(\d+))?", name)
    if match is None:
        raise ValueError(f"--size must be one of {sorted(B.SIZES)} or look like h256-l4 / h64-l2-v512, got {name!r}.")
    hidden, layers, vocab = match.groups()
    return B.Size(name, int(hidden), int(layers), int(vocab) if vocab else 32000)


# ---- one case -----------------------------------------------------------------------------------------------
def build_model(method: str, size: B.Size, max_positions: int, seg_len: int, num_sensory: int, lora_r: int,
                lora_alpha: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The trainable model of ``method`` on a fresh random Llama, gradient checkpointing on, in train mode."""
    base = B.build_backbone(size, device, dtype, max_positions=max_positions)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "full-lora":
        # what SFTTrainer does to the model it trains (before PEFT wraps it)
        add_fused_lm_head(base, outputs=("log_probs", "entropy", "is_top1"))
        config = peft.LoraConfig(task_type="CAUSAL_LM", r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0,
                                 target_modules="all-linear")
        model = peft.get_peft_model(base, config)
    else:
        extra = {"lora_r": lora_r, "lora_alpha": lora_alpha} if method == "hmt-lora" else {}
        model = B.attach_hmt(base, seg_len, num_sensory, 0.5, **extra)
    return model.train()


def train_step(model, ids: torch.Tensor) -> float:
    """One forward + backward with SFTTrainer's loss (mean NLL over every scored token); returns the loss."""
    out = model(input_ids=ids, labels=ids, fused_lm_head=True)
    loss = -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)
    loss.backward()
    value = float(loss.detach())
    del out, loss
    for p in model.parameters():
        p.grad = None
    return value


def run_case(method: str, size: B.Size, length: int, *, batch: int = 1, seg_len: int = 512, num_sensory: int = 32,
             lora_r: int = 8, lora_alpha: int = 32, warmup: int = 1, steps: int = 2, max_positions: int = 0,
             device: str = "cpu", dtype: torch.dtype = torch.float32,
             report: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Build ``method``'s model and time ``warmup`` + ``steps`` training steps on a random (batch, length) row.

    ``report`` (if given) receives a record after every step, so a parent that kills this case keeps the steps it
    finished. Returns the case record: median wall time and tokens/s of the timed steps, and the step peak memory
    (RSS above the resident size before the step, the largest over all steps; CUDA: max_memory_allocated).
    """
    positions = max(max_positions or length, seg_len + num_sensory + 2)  # HMT's segment pass needs its own width
    model = build_model(method, size, positions, seg_len, num_sensory, lora_r, lora_alpha, device, dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, size.vocab, (batch, length), generator=gen).to(device)
    records = []
    for i in range(warmup + steps):
        before, reset_ok = M.step_memory_start(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = train_step(model, ids)
        M.sync(device)
        wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        peak = M.step_memory_peak(device)
        rec = {"step": i, "timed": i >= warmup, "wall_s": wall, "cpu_s": cpu, "loss": loss,
               "before_mib": before, "peak_mib": peak, "step_peak_mib": peak - before, "peak_reset": reset_ok}
        records.append(rec)
        if report is not None:
            report(rec)
    return summarize_case(method, length, batch, records, status="ok", trainable=trainable)


def summarize_case(method: str, length: int, batch: int, records: list[dict[str, Any]], status: str,
                   trainable: Optional[int] = None, error: str = "") -> dict[str, Any]:
    """A case record from its step records (possibly only those finished before a timeout)."""
    timed = [r for r in records if r["timed"]]
    tokens = length * batch
    median = statistics.median(r["wall_s"] for r in timed) if timed else None
    cpu_median = statistics.median(r["cpu_s"] for r in timed) if timed else None
    row = {
        "method": method, "length": length, "batch": batch, "tokens": tokens, "status": status,
        "timed_steps": len(timed), "steps": records,
        "median_s": median, "cpu_median_s": cpu_median,
        "tokens_per_s": tokens / median if median else None,
        "cpu_tokens_per_s": tokens / cpu_median if cpu_median else None,
        "step_peak_mib": max((r["step_peak_mib"] for r in records), default=None),
        "peak_mib": max((r["peak_mib"] for r in records), default=None),
    }
    if trainable is not None:
        row["trainable_params"] = trainable
    if error:
        row["error"] = error
    return row


# ---- the sweep ----------------------------------------------------------------------------------------------
def _worker_args(args: argparse.Namespace, method: str, length: int) -> list[str]:
    return ["--worker", "--method", method, "--length", str(length), "--size", args.size, "--batch", str(args.batch),
            "--segment-length", str(args.segment_length), "--num-sensory", str(args.num_sensory),
            "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha), "--warmup", str(args.warmup),
            "--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype,
            "--threads", str(args.threads), "--max-positions", str(max(args.lengths))]


def run_subprocess_case(args: argparse.Namespace, method: str, length: int) -> dict[str, Any]:
    """One case in a fresh process; a timeout or a crash is recorded with the steps finished before it."""
    env = M.worker_env(M.malloc_env(args.stock_malloc, args.device))
    cmd = [sys.executable, "-m", MODULE, *_worker_args(args, method, length)]
    try:
        proc = subprocess.run(cmd, cwd=O.REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return summarize_case(method, length, args.batch, _step_lines(out), status=f"timeout>{args.timeout:g}s")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        final = json.loads(lines[-1])
        if "method" in final:
            return final
    status = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"failed (rc {proc.returncode})"
    return summarize_case(method, length, args.batch, _step_lines(proc.stdout), status=status,
                          error=proc.stderr[-2000:])


def _step_lines(stdout: str) -> list[dict[str, Any]]:
    records = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if "step" in rec and "method" not in rec:
                records.append(rec)
    return records


def crossover(rows: list[dict[str, Any]], a: str, b: str, key: str) -> Optional[dict[str, Any]]:
    """Where ``b`` first beats ``a`` on ``key`` (higher tokens/s, or lower memory), with the length interpolated
    (log-log) between the two measured lengths around the sign change. None if the order never changes."""
    better_high = key.endswith("tokens_per_s")
    by_len = {}
    for r in rows:
        if r["method"] in (a, b):
            by_len.setdefault(r["length"], {})[r["method"]] = r.get(key)
    # a case without a figure (timed out) or with a zero one (an in-process toy run) gives no ratio
    lengths = sorted(L for L, v in by_len.items() if (v.get(a) or 0) > 0 and (v.get(b) or 0) > 0)

    def log_ratio(L):  # > 0 where b is better than a
        ratio = math.log(by_len[L][b] / by_len[L][a])
        return ratio if better_high else -ratio

    for lo, hi in zip(lengths, lengths[1:]):
        f_lo, f_hi = log_ratio(lo), log_ratio(hi)
        if f_lo <= 0 < f_hi:
            t = f_lo / (f_lo - f_hi)
            at = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
            return {"metric": key, "a": a, "b": b, "between": [lo, hi], "length": at}
    if lengths and log_ratio(lengths[0]) > 0:
        return {"metric": key, "a": a, "b": b, "between": None, "length": None, "note": f"{b} ahead at every length"}
    return None


def sweep(args: argparse.Namespace, run: Callable[[argparse.Namespace, str, int], dict[str, Any]] = run_subprocess_case
          ) -> dict[str, Any]:
    rows = []
    load = {"start": M.loadavg()}
    for length in args.lengths:
        for method in args.methods:
            row = run(args, method, length)
            rows.append(row)
            print(format_row(row), flush=True)
    load["end"] = M.loadavg()
    result: dict[str, Any] = {"rows": rows, "loadavg": load, "crossover": {}}
    hmt = [m for m in ("hmt-lora", "hmt-frozen") if m in args.methods]
    if "full-lora" in args.methods:
        for m in hmt:
            for key in ("tokens_per_s", "step_peak_mib"):
                result["crossover"][f"{m}:{key}"] = crossover(rows, "full-lora", m, key)
    return result


def format_row(row: dict[str, Any]) -> str:
    tps = f"{row['tokens_per_s']:8.0f} tok/s" if row["tokens_per_s"] else "       - tok/s"
    mem = f"{row['step_peak_mib']:8.0f} MiB" if row["step_peak_mib"] is not None else "       - MiB"
    med = f"median {row['median_s']:.2f} s of {row['timed_steps']}" if row["median_s"] else "no timed step"
    return f"{row['method']:10s} {row['length']:6d} tokens | {tps} | step peak {mem} | {med} | {row['status']}"


def plot(result: dict[str, Any], path) -> None:
    plt = O.pyplot()
    rows = result["rows"]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    styles = {"full-lora": ("C3", "o-"), "hmt-lora": ("C0", "s-"), "hmt-frozen": ("C2", "^--")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, key, ylabel in ((axes[0], "tokens_per_s", "training tokens / s"),
                            (axes[1], "step_peak_mib", "training-step peak above pre-step RSS (MiB)")):
        for m in methods:
            sel = sorted((r for r in rows if r["method"] == m), key=lambda r: r["length"])
            ok = [r for r in sel if (r.get(key) or 0) > 0]  # log axes: a timed-out case has no figure
            color, style = styles[m]
            ax.plot([r["length"] for r in ok], [r[key] for r in ok], style, color=color, label=LABELS[m])
            for r in sel:
                if not r["status"].startswith("ok"):
                    y = r.get(key) or (ok[-1][key] if ok else 1)
                    ax.annotate(r["status"] + (f"\n({r['timed_steps']} timed step)" if r["timed_steps"] else ""),
                                (r["length"], y), textcoords="offset points", xytext=(-10, 10), fontsize=7, color=color)
                    ax.plot([r["length"]], [y], "x", color=color, markersize=9)
        for name, cross in result.get("crossover", {}).items():
            if cross and cross.get("length") and cross["metric"] == key:
                ax.axvline(cross["length"], color="grey", linestyle=":", linewidth=1)
                ax.annotate(f"crossover ~{cross['length']:.0f}\n({LABELS[cross['b']]})", (cross["length"], 0.02),
                            xycoords=("data", "axes fraction"), fontsize=7, color="grey", xytext=(3, 0),
                            textcoords="offset points")
            elif cross and cross["metric"] == key and cross.get("note"):
                ax.text(0.02, 0.02, f"no crossover: {LABELS[cross['b']]} ahead at every length", fontsize=8,
                        color="grey", transform=ax.transAxes)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per row (batch 1)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    axes[0].set_title("one training step (forward + backward), checkpointing on")
    axes[1].set_title("peak memory of the step")
    O.save_figure(fig, path)


def markdown(payload: dict[str, Any]) -> str:
    """The results table of a run (what benchmarks/results/train_length.md starts with)."""
    rows = payload["rows"]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lengths = sorted({r["length"] for r in rows})
    by = {(r["method"], r["length"]): r for r in rows}

    def cell(r, key, fmt):
        if r is None or not r.get(key):
            return "-"
        text = fmt.format(r[key])
        return text if r["status"] == "ok" else f"{text}*"

    head = ["tokens"] + [f"{LABELS[m]} {what}" for m in methods for what in ("tok/s", "CPU tok/s", "step peak MiB")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for L in lengths:
        cells = [str(L)]
        for m in methods:
            r = by.get((m, L))
            cells += [cell(r, "tokens_per_s", "{:.0f}"), cell(r, "cpu_tokens_per_s", "{:.0f}"),
                      cell(r, "step_peak_mib", "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['method']} at {r['length']}: {r['status']}, {r['timed_steps']} timed step(s) finished"
             + (f" (warm-up step {r['steps'][0]['wall_s']:.0f} s wall)" if r["steps"] else "")
             for r in rows if r["status"] != "ok"]
    if notes:
        lines += ["", "`*` from a case that did not finish all its steps:", *notes]
    cross = []
    for name, c in payload.get("crossover", {}).items():
        if c is None:
            cross.append(f"- {name}: no crossover in the measured range")
        elif c.get("length"):
            cross.append(f"- {name}: {LABELS[c['b']]} passes {LABELS[c['a']]} between {c['between'][0]} and "
                         f"{c['between'][1]} tokens (log-log interpolation: ~{c['length']:.0f})")
        else:
            cross.append(f"- {name}: {c.get('note', '')}")
    for m in methods:
        if m != "full-lora" and "full-lora" in methods:
            c = crossover(rows, "full-lora", m, "cpu_tokens_per_s")
            if c and c.get("length"):
                cross.append(f"- {m}:cpu_tokens_per_s: {LABELS[m]} passes {LABELS['full-lora']} between "
                             f"{c['between'][0]} and {c['between'][1]} tokens (~{c['length']:.0f})")
            else:
                cross.append(f"- {m}:cpu_tokens_per_s: " + (c.get("note", "") if c else "no crossover in the measured range"))
    lines += ["", "Crossovers (tok/s: where HMT becomes faster; step peak: where it needs less memory):", *cross]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.worker:
        def report(rec):
            print(json.dumps(rec), flush=True)

        row = run_case(args.method, parse_size(args.size), args.length, batch=args.batch, seg_len=args.segment_length,
                       num_sensory=args.num_sensory, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                       warmup=args.warmup, steps=args.steps, max_positions=args.max_positions, device=args.device,
                       dtype=B.parse_dtype(args.dtype), report=report)
        print(json.dumps(row), flush=True)
        return
    parse_size(args.size)  # fail before the first case on a bad name
    result = sweep(args)
    name = "train_length" + (f"-{args.tag}" if args.tag else "")
    path = O.save_results(MODULE, name, args, result, lambda png: plot(result, png))
    print(markdown(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
