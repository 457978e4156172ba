"""Shared helpers of the benchmark scripts: model builders, timing, peak memory, JSON and PNG output.

Nothing here downloads anything: the backbones are randomly initialised Llama models built from a config
(throughput and memory do not depend on the weights' values).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

#: The committed results (README and BENCHMARKS.md cite them); written only with --update-results.
RESULTS = Path(__file__).resolve().parent / "results"
#: Where a run writes by default (git-ignored).
OUTPUT = Path(__file__).resolve().parent / "output"
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Size:
    """A tiny-Llama size: hidden width and depth (vocab 32000 so the LM head costs what a real one does)."""

    name: str
    hidden: int
    layers: int
    vocab: int = 32000

    @property
    def heads(self) -> int:
        return max(1, self.hidden // 64)

    @property
    def intermediate(self) -> int:
        return (self.hidden * 8 // 3 + 63) // 64 * 64


SIZES = {"h256-l4": Size("h256-l4", 256, 4), "h512-l8": Size("h512-l8", 512, 8)}


def parse_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def llama(
    vocab: int, hidden: int, layers: int, heads: int, intermediate: int, max_positions: int, tie: bool,
    dtype: torch.dtype = torch.float32, seed: int = 0, **config: Any,
):
    """The one backbone builder of the benchmarks: a random Llama causal LM from a config (sdpa attention)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        tie_word_embeddings=tie, attn_implementation="sdpa", **config,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def build_backbone(
    size: Size, device: str = "cpu", dtype: torch.dtype = torch.float32, four_bit: bool = False, max_positions: int = 8192
):
    """A frozen random Llama causal LM of ``size`` on ``device`` (optionally loaded as a 4-bit nf4 model)."""
    from transformers import AutoModelForCausalLM

    model = llama(size.vocab, size.hidden, size.layers, size.heads, size.intermediate, max_positions, False, dtype)
    if four_bit:
        from transformers import BitsAndBytesConfig

        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=dtype, device_map=device)
    else:
        model = model.to(device)
    model.requires_grad_(False)
    return model.eval()


def attach_hmt(base, segment_length: int, num_sensory: int = 32, summary_fraction: float = 0.5, **extra: Any):
    """``peft.get_peft_model`` with an HMTConfig; returns the PeftModel (its ``.base_model`` is the HMTModel)."""
    import peft

    from hmt_adapter import HMTConfig

    config = HMTConfig(
        task_type="CAUSAL_LM",
        segment_length=segment_length,
        num_sensory=num_sensory,
        summary_fraction=summary_fraction,
        **extra,
    )
    return peft.get_peft_model(base, config)


def limit_ratio(segment_length: int, num_sensory: int, summary_fraction: float) -> float:
    """Issue 5's token-count limit: HMT positions per window token."""
    return 1 + summary_fraction + (num_sensory + 4) / segment_length


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


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Machine, versions and thread count, stored beside every figure."""
    import peft
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


# ---- memory ---------------------------------------------------------------------------------------------
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
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
    return value / 1024


#: glibc raises its mmap threshold each time a large mmapped block is freed (up to 32 MiB), after which
#: freed per-segment buffers (a segment's logits chunk is ~16 MiB at vocab 32000) stay resident in the heap
#: and RSS grows with the number of segments although nothing is alive. A fixed threshold turns that off,
#: so peak RSS reflects live memory; ``--stock-malloc`` measures glibc's default behaviour instead.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_worker(module: str, args: list[str], timeout: float = 900, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m module *args`` in a fresh process (so its peak RSS is its own) and parse the JSON it
    prints on its last stdout line."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {}))
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {module} {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- output ---------------------------------------------------------------------------------------------
def add_output_arguments(parser: Any) -> None:
    """``--output-dir`` (default benchmarks/output, git-ignored) and ``--update-results`` (write the committed
    benchmarks/results files instead)."""
    parser.add_argument("--output-dir", default=str(OUTPUT), help="where to write JSON + PNG (default: %(default)s)")
    parser.add_argument("--update-results", action="store_true",
                        help="write into benchmarks/results, replacing the committed results README cites")


def output_dir(args: Any) -> Path:
    """The directory a run writes to (created)."""
    path = RESULTS if getattr(args, "update_results", False) else Path(getattr(args, "output_dir", OUTPUT))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def save_results(module: str, name: str, args: Any, result: dict[str, Any], plot: Callable[[Path], None]) -> Path:
    """Write ``NAME.json`` (with the command, machine and arguments) and ``NAME.png`` via ``plot`` into
    `output_dir`."""
    payload = {"command": command_line(module), "machine": machine_info(args.device), "args": vars(args), **result}
    path = write_json(output_dir(args) / (name + ".json"), payload)
    plot(path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return path


def command_line(module: str) -> str:
    """The command that produced a result, as a user would type it from the repository root."""
    return " ".join(["PYTHONPATH=. python -m", module, *sys.argv[1:]])


def plot_rate_bars(rows: list[dict[str, Any]], path: Path, names: Callable[[list[dict[str, Any]]], list[str]],
                   reference: Callable[[dict[str, Any]], float], reference_label: str, reference_at: str,
                   tick: Callable[[dict[str, Any]], str], title: Callable[[str, list[dict[str, Any]]], str]) -> None:
    """One panel per ``mode``: grouped bars of ``row[name]["tokens_per_s"]`` for each row, and a dashed outline bar
    at the ``reference_at`` bar's place with height ``reference(row)`` (a target or a limit)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        sel = [r for r in rows if r["mode"] == mode]
        shown = names(sel)
        width = 0.8 / len(shown)
        for i, name in enumerate(shown):
            ax.bar([j + i * width for j in range(len(sel))], [r[name]["tokens_per_s"] for r in sel], width, label=name)
        ax.bar([j + shown.index(reference_at) * width for j in range(len(sel))], [reference(r) for r in sel], width,
               fill=False, edgecolor="black", linestyle="--", label=reference_label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sel))])
        ax.set_xticklabels([tick(r) for r in sel])
        ax.set_ylabel("tokens / s")
        ax.set_title(title(mode, sel))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
