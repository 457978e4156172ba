"""Where a benchmark writes, what it writes beside its figures, and how it reports progress.

A run writes ``NAME.json`` and ``NAME.png`` into ``--output-dir`` (default ``benchmarks/output``, git-ignored), or,
with ``--update-results``, into ``benchmarks/results`` (the committed files README.md and BENCHMARKS.md cite).
Every JSON stores the command that produced it and the machine it ran on.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import peft
import torch
import transformers

#: The repository root (benchmarks run from here, as ``python -m benchmarks.NAME``).
REPO = Path(__file__).resolve().parents[2]
#: The committed results (README and BENCHMARKS.md cite them); written only with --update-results.
RESULTS = REPO / "benchmarks" / "results"
#: Where a run writes by default (git-ignored).
OUTPUT = REPO / "benchmarks" / "output"


# ---- where ----------------------------------------------------------------------------------------------------------
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


# ---- what -----------------------------------------------------------------------------------------------------------
def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def write_result(out_dir: Path, name: str, payload: dict[str, Any],
                 plot: Callable[[dict[str, Any], Path], None]) -> Path:
    """Write ``NAME.json`` (``payload``) and ``NAME.png`` (``plot(payload, path)``) into ``out_dir`` and say so."""
    path = write_json(out_dir / f"{name}.json", payload)
    plot(payload, path.with_suffix(".png"))
    print(f"wrote {path} and {name}.png")
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


def quoted_command(prefix: str, argv: Optional[Sequence[str]] = None) -> str:
    """``prefix`` (e.g. ``python -m benchmarks.quality``) followed by the arguments, each shell-quoted (default: this
    process's own)."""
    return prefix + "".join(" " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Machine, versions and thread count, stored beside every figure."""
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


# ---- progress ---------------------------------------------------------------------------------------------------------
def logger(start: Optional[float] = None) -> Callable[[str], None]:
    """A ``log(message)`` that prints ``[  elapsed s] message`` (seconds since ``start``, default now), flushed."""
    start = time.perf_counter() if start is None else start

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)

    return log


def quiet_torch_run(threads: int) -> None:
    """A long benchmark's console and threads: ``threads`` torch threads, no datasets / transformers progress bars or
    info logs (the script's own ``log`` lines say what is happening)."""
    import datasets
    import torch
    import transformers

    torch.set_num_threads(max(1, threads))
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()


# ---- figures ----------------------------------------------------------------------------------------------------------
def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (figures go to files, never to a window)."""
    import matplotlib  # here, not at the top: the backend must be chosen before pyplot is first imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rate_bars(rows: list[dict[str, Any]], path: Path, names: Callable[[list[dict[str, Any]]], list[str]],
                   reference: Callable[[dict[str, Any]], float], reference_label: str, reference_at: str,
                   tick: Callable[[dict[str, Any]], str], title: Callable[[str, list[dict[str, Any]]], str]) -> None:
    """One panel per ``mode``: grouped bars of ``row[name]["tokens_per_s"]`` for each row, and a dashed outline bar
    at the ``reference_at`` bar's place with height ``reference(row)`` (a target or a limit)."""
    plt = pyplot()
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
    save_figure(fig, path)


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Lay out (unless the figure has its own layout engine), write and close a figure (cropped to what it draws, so a
    legend beside the axes is kept whole)."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
