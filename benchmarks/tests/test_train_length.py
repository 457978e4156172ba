"""benchmarks/train_length.py on a tiny Llama: the case function, the sweep's JSON fields, the crossover and the
plot, and one case through the worker process. No timing or memory values are asserted (the machine is shared)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from benchmarks import train_length as TL
from benchmarks.lab import backbone as B
from benchmarks.lab import output as O

TINY = "h64-l2-v256"
ARGS = ["--size", TINY, "--lengths", "96", "192", "--segment-length", "64", "--num-sensory", "8", "--steps", "1",
        "--threads", "1"]


def _in_process(args: argparse.Namespace, method: str, length: int) -> dict:
    return TL.run_case(method, TL.parse_size(args.size), length, batch=args.batch, seg_len=args.segment_length,
                       num_sensory=args.num_sensory, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                       warmup=args.warmup, steps=args.steps, max_positions=max(args.lengths))


def test_parse_size_accepts_named_and_spelt_sizes() -> None:
    assert TL.parse_size("h256-l4") is B.SIZES["h256-l4"]
    size = TL.parse_size(TINY)
    assert (size.hidden, size.layers, size.vocab) == (64, 2, 256)
    with pytest.raises(ValueError, match="--size"):
        TL.parse_size("big")


@pytest.mark.parametrize("method", TL.METHODS)
def test_run_case_reports_every_step(method: str) -> None:
    row = TL.run_case(method, TL.parse_size(TINY), 160, seg_len=64, num_sensory=8, warmup=1, steps=2)
    assert row["method"] == method and row["length"] == 160 and row["tokens"] == 160 and row["status"] == "ok"
    assert [s["timed"] for s in row["steps"]] == [False, True, True] and row["timed_steps"] == 2
    assert row["tokens_per_s"] > 0 and math.isfinite(row["step_peak_mib"])
    assert all(math.isfinite(s["loss"]) for s in row["steps"])
    # LoRA on both LoRA methods, HMT parameters only on the frozen one
    assert row["trainable_params"] > 0
    if method == "hmt-frozen":
        lora_row = TL.run_case("hmt-lora", TL.parse_size(TINY), 64, seg_len=64, num_sensory=8, warmup=0, steps=1)
        assert lora_row["trainable_params"] > row["trainable_params"]


def test_sweep_writes_json_and_png_with_command_machine_and_load(tmp_path: Path) -> None:
    args = TL.make_parser().parse_args(ARGS + ["--output-dir", str(tmp_path), "--methods", *TL.METHODS])
    result = TL.sweep(args, run=_in_process)
    O.save_results(TL.MODULE, "train_length", args, result, lambda png: TL.plot(result, png))
    payload = json.loads((tmp_path / "train_length.json").read_text())
    assert (tmp_path / "train_length.png").stat().st_size > 0
    assert payload["command"].startswith("PYTHONPATH=. python -m benchmarks.train_length")
    assert {"torch", "transformers", "peft", "cpu", "torch_threads"} <= set(payload["machine"])
    assert set(payload["loadavg"]) == {"start", "end"}
    rows = payload["rows"]
    assert sorted((r["method"], r["length"]) for r in rows) == sorted((m, L) for m in TL.METHODS for L in (96, 192))
    for r in rows:
        assert {"tokens_per_s", "cpu_tokens_per_s", "median_s", "step_peak_mib", "peak_mib", "status", "steps"} <= set(r)
    md = TL.markdown(payload)
    assert "| 96 |" in md and "| 192 |" in md and "Crossovers" in md
    assert set(payload["crossover"]) == {f"{m}:{k}" for m in ("hmt-lora", "hmt-frozen") for k in ("tokens_per_s", "step_peak_mib")}


def test_crossover_interpolates_between_the_lengths_around_the_sign_change() -> None:
    rows = [{"method": "full-lora", "length": L, "tokens_per_s": v} for L, v in ((1024, 400.0), (2048, 300.0), (4096, 100.0))]
    rows += [{"method": "hmt-lora", "length": L, "tokens_per_s": 200.0} for L in (1024, 2048, 4096)]
    cross = TL.crossover(rows, "full-lora", "hmt-lora", "tokens_per_s")
    assert cross["between"] == [2048, 4096] and 2048 < cross["length"] < 4096
    # memory: lower is better
    mem = [{"method": m, "length": L, "step_peak_mib": v} for m, L, v in
           (("full-lora", 1024, 50.0), ("full-lora", 2048, 300.0), ("hmt-lora", 1024, 100.0), ("hmt-lora", 2048, 100.0))]
    assert TL.crossover(mem, "full-lora", "hmt-lora", "step_peak_mib")["between"] == [1024, 2048]
    assert TL.crossover(rows[:3] + [{"method": "hmt-lora", "length": L, "tokens_per_s": 1.0} for L in (1024, 2048, 4096)],
                        "full-lora", "hmt-lora", "tokens_per_s") is None


def test_markdown_marks_unfinished_cases() -> None:
    done = TL.summarize_case("hmt-lora", 1024, 1, [{"timed": True, "wall_s": 2.0, "cpu_s": 1.0, "step_peak_mib": 5.0,
                                                   "peak_mib": 9.0}], status="ok")
    cut = TL.summarize_case("full-lora", 1024, 1, [{"timed": False, "wall_s": 9.0, "cpu_s": 9.0, "step_peak_mib": 50.0,
                                                   "peak_mib": 90.0}], status="timeout>5s")
    md = TL.markdown({"rows": [cut, done], "crossover": {}})
    assert "| 1024 | - | - | 50* | 512 | 1024 | 5 |" in md
    assert "full-lora at 1024: timeout>5s, 0 timed step(s) finished (warm-up step 9 s wall)" in md


def test_a_case_runs_in_its_own_process_and_a_timeout_is_recorded(tmp_path: Path) -> None:
    args = TL.make_parser().parse_args(ARGS + ["--output-dir", str(tmp_path), "--timeout", "300"])
    row = TL.run_subprocess_case(args, "hmt-lora", 96)
    assert row["status"] == "ok" and row["timed_steps"] == 1 and row["steps"][0]["peak_reset"] in (True, False)
    args.timeout = 0.5  # far shorter than importing torch: killed before any step
    row = TL.run_subprocess_case(args, "full-lora", 96)
    assert row["status"].startswith("timeout") and row["tokens_per_s"] is None and row["steps"] == []
