"""Timing, peak memory and fresh worker processes: how the speed and memory benchmarks measure.

Nothing here downloads anything; the cases time whatever models they are given.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from benchmarks.lab.output import REPO


def limit_ratio(segment_length: int, num_sensory: int, summary_fraction: float) -> float:
    """Issue 5's token-count limit: HMT positions per window token."""
    return 1 + summary_fraction + (num_sensory + 4) / segment_length


# ---- time -------------------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(
    fns: dict[str, Callable[[], Any]], device: str = "cpu", warmup: int = 1, repeats: int = 3
) -> dict[str, dict[str, Any]]:
    """Time several functions round-robin (A B C A B C ...), so load from other processes hits all alike.

    Each function runs ``warmup`` times untimed, then ``repeats`` timed rounds. Returns per name the median
    wall time and the median CPU time of this process (s), and every wall time.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: {"median_s": statistics.median(wall[name]), "cpu_median_s": statistics.median(cpu[name]), "times_s": wall[name]}
        for name in fns
    }


def loadavg() -> str:
    """``/proc/loadavg`` (the machine's load, stored beside figures measured on a shared machine)."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


# ---- what is timed: the same tokens read by HMT, by the backbone over windows, and with full attention ----------------
def inference_cases(base, hmt, ids: torch.Tensor, seg_len: int, full: bool) -> dict[str, Callable[[], Any]]:
    """No-grad callables that produce logits for every token of ``ids`` (B, T)."""

    @torch.no_grad()
    def windows():
        return [base(input_ids=ids[:, s : s + seg_len]).logits for s in range(0, ids.shape[1], seg_len)]

    @torch.no_grad()
    def run_hmt():
        return hmt(input_ids=ids).logits

    @torch.no_grad()
    def run_full():
        return base(input_ids=ids).logits

    cases = {"windows": windows, "hmt": run_hmt}
    if full:
        cases["full"] = run_full
    return cases


def training_cases(base, hmt, ids: torch.Tensor, seg_len: int, full: bool) -> dict[str, Callable[[], Any]]:
    """Forward + backward callables over ``ids`` (B, T) with the causal-LM loss on every token."""
    embed = base.get_input_embeddings()
    hmt_params = [p for p in hmt.parameters() if p.requires_grad]

    def backbone_step(x: torch.Tensor) -> None:
        inputs = embed(x).detach().requires_grad_(True)
        base(inputs_embeds=inputs, labels=x).loss.backward()

    def windows():
        for s in range(0, ids.shape[1], seg_len):
            backbone_step(ids[:, s : s + seg_len])

    def run_hmt(fused: bool = False):
        for p in hmt_params:
            p.grad = None
        kwargs = {"fused_lm_head": True} if fused else {}
        hmt(input_ids=ids, labels=ids, **kwargs).loss.backward()

    cases = {"windows": windows, "hmt": run_hmt, "hmt_fused": lambda: run_hmt(True)}
    if full:
        cases["full"] = lambda: backbone_step(ids)
    return cases


# ---- memory -----------------------------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (Linux ``clear_refs``); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def current_rss_mib() -> float:
    value = _proc_status_kib("VmRSS")
    return float("nan") if value is None else value / 1024


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (since the last `reset_peak_rss`), MiB."""
    value = _proc_status_kib("VmHWM")
    if value is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        import resource  # here: a Unix-only module, needed only off Linux

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
    return value / 1024


def step_memory_start(device: str) -> tuple[float, bool]:
    """Before a measured step: reset the peak (CUDA allocator, or this process's RSS high-water mark) and return (the
    memory in use now, MiB; whether the peak could be reset)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20, True
    reset_ok = reset_peak_rss()
    return current_rss_mib(), reset_ok


def step_memory_peak(device: str) -> float:
    """After a measured step: the peak since `step_memory_start` (CUDA: max_memory_allocated; CPU: VmHWM), MiB."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib()


# ---- fresh processes --------------------------------------------------------------------------------------------------
#: glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), after which
#: freed per-segment buffers (a segment's logits chunk is ~16 MiB at vocab 32000) stay resident in the heap
#: and RSS grows with the number of segments although nothing is alive. A fixed threshold turns that off,
#: so peak RSS reflects live memory; ``--stock-malloc`` measures glibc's default behaviour instead.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def add_stock_malloc_argument(parser: Any) -> None:
    """``--stock-malloc``: measure with glibc's own dynamic mmap threshold instead of `FIXED_MMAP_THRESHOLD`."""
    parser.add_argument("--stock-malloc", action="store_true",
                        help="keep glibc's dynamic mmap threshold (RSS then also counts freed, retained heap)")


def malloc_env(stock_malloc: bool, device: str) -> dict[str, str]:
    """The allocator setting of a worker that measures RSS: `FIXED_MMAP_THRESHOLD` on the CPU unless
    ``--stock-malloc``; nothing on CUDA (its caching allocator is not glibc's)."""
    return {} if stock_malloc or device.startswith("cuda") else dict(FIXED_MMAP_THRESHOLD)


def worker_env(extra_env: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment of a worker process: this one's, the repository root on PYTHONPATH, and ``extra_env``."""
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {}))


def run_worker(module: str, args: list[str], timeout: float = 900, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m module *args`` in a fresh process (so its peak RSS is its own) and parse the JSON it
    prints on its last stdout line."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=worker_env(extra_env), capture_output=True, text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {module} {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
