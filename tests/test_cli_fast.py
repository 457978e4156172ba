"""Help and mistakes in arguments are answered before any framework is imported (each run in a fresh interpreter).

Measured by the modules a run leaves in ``sys.modules``, not by wall time: torch, transformers, TRL, PEFT, datasets
and accelerate are what made ``train --help`` take 7-10 s. This file imports none of them itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny-offline.yaml")
FRAMEWORKS = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")
RUN_MAIN = f"""
import json, os, sys
from hmt_adapter_cli.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
sys.stdout.flush()
sys.stderr.flush()
with open(os.environ["HMT_TEST_REPORT"], "w") as f:
    json.dump({{"code": code, "imported": sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)}}, f)
"""


def run_cli(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), HMT_TEST_REPORT=str(report), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", RUN_MAIN, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert report.exists(), proc.stderr
    return proc, json.loads(report.read_text())


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (("train", "--help"), ["--segment_length (default: 256)", "New tokens per segment", "--stage2_max_steps",
                           "resolve against the recipe file's folder", "against the working directory",
                           "outputs/<recipe name>/", "--data_format (default: 'auto')", "ONE stage with recall",
                           "stage 1 is skipped", "--curriculum (default: False)", "--curriculum_ramp_fraction",
                           "--completion_eos (default: True)"]),
    (("lm-eval", "--help"), ["--model hmt", "pretrained=BASE", "peft=ADAPTER_DIR", "recall_query", "usage: lm-eval"]),
    (("demo", "--help"), ["--output-dir", "hmt-demo-output, in the working directory", "--output_dir"]),
    (("eval", "--help"), ["--data-files", "--data_files", "in the working directory"]),
])
def test_help_imports_no_framework(tmp_path, args, expected) -> None:
    proc, report = run_cli(tmp_path, *args)
    assert report == {"code": 0, "imported": []}, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps help to the terminal's width
    for needle in expected:
        assert needle in text, needle


@pytest.mark.parametrize("args, expected", [
    (("train", TINY, "--segment_length", "abc"), ["argument --segment_length: invalid int value: 'abc'", "--help"]),
    (("train", TINY, "--segment-length=abc"), ["argument --segment_length: invalid int value: 'abc'"]),
    (("train", TINY, "--write_token", "last"), ["--write_token", "'last'", "'memory', 'learned'"]),
    (("train", TINY, "--lr_decay_factor", "fast"), ["--lr_decay_factor", "invalid float value"]),
    (("train", TINY, "--load_in_4bit", "maybe"), ["--load_in_4bit", "invalid bool value"]),
    (("train", TINY, "--curriculum", "maybe"), ["--curriculum", "invalid bool value"]),
    (("train", TINY, "--curriculum_min_segments", "two"), ["--curriculum_min_segments: invalid int value: 'two'"]),
    (("train", TINY, "--data_format", "qa"), ["--data_format", "'qa'", "'prompt_completion'"]),
    (("train",), ["no recipe given"]),
    # both spellings: the underscore flags reach the parser (the error is about their values, not unknown flags)
    (("demo", "--output_dir", "x", "--hmt_steps", "z"), ["argument --hmt-steps: invalid int value: 'z'"]),
    (("eval", "--adapter", "missing-adapter", "--data_files", "docs.jsonl"), ["--adapter: 'missing-adapter' is not a directory"]),
    (("eval", "--adapter", "missing-adapter", "--no_sliding", "--max_tokens", "many"), ["--max-tokens: invalid int value"]),
    (("eval", "--adapter", "x", "--bogus"), ["unrecognized arguments: --bogus", "hmt-adapter eval --help"]),
])
def test_argument_errors_are_one_line_and_import_no_framework(tmp_path, args, expected) -> None:
    proc, report = run_cli(tmp_path, *args)
    assert report == {"code": 2, "imported": []}, proc.stderr
    line = one_error_line(proc)
    assert line.startswith(f"hmt-adapter {args[0]}: error: "), line
    for text in expected:
        assert text in line, line


def test_flag_values_are_checked_like_trls_parser() -> None:
    """The fast check accepts what TRL's parser accepts (it only answers earlier)."""
    from hmt_adapter_cli.arguments import check_flag_values

    check_flag_values(["--segment_length", "8", "--load_in_4bit", "--bptt_depth", "2", "--write_token=learned",
                       "--concatenate_documents", "false", "--learning_rate", "1e-3", "--report_to", "none",
                       "--tokenizer_name_or_path", "gpt2", "--summary_fraction", "0.25"])
    with pytest.raises(ValueError, match="--num_sensory: expected one argument"):
        check_flag_values(["--num_sensory", "--segment_length", "8"])


def test_normalize_flags_changes_flag_names_only() -> None:
    from hmt_adapter_cli.arguments import normalize_flags

    assert normalize_flags(["--data_files", "a_b.jsonl", "--text_field=my_text", "-h", "--", "--x_y"]) == [
        "--data-files", "a_b.jsonl", "--text-field=my_text", "-h", "--", "--x_y"]
