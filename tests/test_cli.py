"""The command line's first minutes, as a user meets them: one-line errors that say what to change, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import peft
import pytest

from hmt_adapter import HMTConfig
from hmt_adapter.testing import tiny_causal_lm

REPO = os.path.join(os.path.dirname(__file__), os.pardir)
TINY = os.path.join(REPO, "recipes", "tiny-offline.yaml")


def cli(*args: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(REPO), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "hmt_adapter_cli.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=300,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not proc.stderr.startswith("usage:")  # no page of usage before the error


def test_version() -> None:
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("hmt-adapter ")


def test_train_without_a_recipe_says_so() -> None:
    assert_one_line_error(cli("train"), "no recipe given", "hmt-adapter train RECIPE.yaml")
    assert_one_line_error(cli("train", "nope.yaml"), "'nope.yaml' not found")


def test_train_bad_hmt_value_reads_as_the_api() -> None:
    assert_one_line_error(cli("train", TINY, "--segment_length", "-4"), "HMTConfig.segment_length must be >= 1, got -4.")


def test_train_bad_value_type_is_one_line() -> None:
    assert_one_line_error(cli("train", TINY, "--segment_length", "many"), "segment_length", "--help")


def test_train_help_leads_with_hmt_fields() -> None:
    proc = cli("train", "--help")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("usage: hmt-adapter train RECIPE.yaml")
    text = proc.stdout
    assert "--segment_length (default: 256)" in text and "New tokens per segment" in text
    assert "--stage2_max_steps" in text and "--help-all" in text
    assert len(lines) < 150  # SFTConfig's ~800 lines only with --help-all


@pytest.fixture
def adapter_dir(tmp_path):
    model = peft.get_peft_model(tiny_causal_lm("llama"), HMTConfig(segment_length=8, num_sensory=2, recall_dim=8))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_eval_missing_data_file_and_missing_data(adapter_dir, tmp_path) -> None:
    common = ("eval", "--adapter", str(adapter_dir), "--model", "hmt-testing:llama")
    assert_one_line_error(cli(*common, "--data-files", "nope.jsonl"), "--data-files", "'nope.jsonl' not found")
    assert_one_line_error(cli(*common), "--data-files", "--dataset-name")
    assert_one_line_error(cli("eval", "--adapter", str(tmp_path / "missing")), "--adapter", "not a directory")


def test_eval_refuses_an_adapter_saved_for_another_backbone(adapter_dir, tmp_path) -> None:
    """Saved on a Llama, evaluated on a GPT-2 of the same width: one line naming both, not a perplexity."""
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "the cat sees the dog . " * 4}) + "\n")
    proc = cli("eval", "--adapter", str(adapter_dir), "--model", "hmt-testing:gpt2", "--data-files", str(data),
               "--no-sliding", "--threads", "1", cwd=str(tmp_path))
    assert_one_line_error(proc, "saved for LlamaForCausalLM", "loaded onto GPT2LMHeadModel")


def test_eval_writes_into_its_output_dir_not_the_current_one(adapter_dir, tmp_path) -> None:
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": "the cat sees the dog . " * 4}) for _ in range(2)))
    work = tmp_path / "work"
    work.mkdir()
    proc = cli("eval", "--adapter", str(adapter_dir), "--model", "hmt-testing:llama", "--data-files", str(data),
               "--no-sliding", "--threads", "1", cwd=str(work))
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(work)) == ["hmt-eval-output"]
    assert sorted(os.listdir(work / "hmt-eval-output")) == ["loss.png", "results.json"]


def test_third_party_notices_are_silenced_narrowly(caplog) -> None:
    import logging
    import warnings

    from hmt_adapter_cli.quiet import BNB_LOGGER, silence_third_party_notices

    silence_third_party_notices()
    logger = logging.getLogger(BNB_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BNB_LOGGER):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "x")
        logger.warning("another bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        silence_third_party_notices()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]


def test_recipe_run_records_training_in_the_card(tmp_path) -> None:
    proc = cli("train", TINY, "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"hmt-adapter train: writing the adapter to {tmp_path / 'out'}\n")  # said first
    assert "FutureWarning" not in proc.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Trained with `hmt-adapter train`" in card and "stage 2 (recall): 3 steps on 4-segment rows" in card
    assert "stage2 training loss (first -> last logged)" in card


# ---- data with no documents: one line that names the file ----------------------------------------------------
def _main_error(capsys, *argv: str) -> str:
    """Run the CLI in this process; it must exit 2 with one stderr line (no traceback). Returns that line."""
    from hmt_adapter_cli.cli import main

    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "examples/s]" not in line]
    assert len(lines) == 1, lines
    return lines[0]


NO_DOCUMENTS = {"empty.jsonl": "", "blank.txt": "\n  \n\n", "empty-texts.jsonl": '{"text": ""}\n{"text": "  "}\n'}


@pytest.mark.parametrize("name", sorted(NO_DOCUMENTS))
def test_train_on_data_without_documents_is_one_line(tmp_path, capsys, name) -> None:
    (tmp_path / name).write_text(NO_DOCUMENTS[name])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: hmt-testing:llama\ndata_files: {name}\nsegment_length: 8\n"
                      "num_sensory: 2\nrecall_dim: 8\nreport_to: none\n")
    line = _main_error(capsys, "train", str(recipe), "--output_dir", str(tmp_path / "out"))
    assert line.startswith("hmt-adapter train: error: ") and str(tmp_path / name) in line
    assert "add documents" in line
    assert not (tmp_path / "out").exists()


def test_eval_on_data_without_documents_is_one_line(adapter_dir, tmp_path, capsys) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    line = _main_error(capsys, "eval", "--adapter", str(adapter_dir), "--model", "hmt-testing:llama",
                       "--data_files", str(tmp_path / "empty.jsonl"))
    assert line.startswith("hmt-adapter eval: error: ") and "empty.jsonl' is empty" in line and "add documents" in line


# ---- the Hub out of reach: one line at once, not a minute of retries and a traceback -------------------------
@pytest.mark.parametrize("hub_env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "unreachable"])
def test_train_with_the_hub_out_of_reach_says_how_to_pass_local_paths(tmp_path, hub_env) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(hub_env, HF_HOME=str(tmp_path / "hf-home"))  # an empty cache
    proc = subprocess.run(
        [sys.executable, "-m", "hmt_adapter_cli.cli", "train", os.path.join(REPO, "recipes", "smollm-135m.yaml")],
        cwd=tmp_path, env=dict(env, PYTHONPATH=os.path.abspath(REPO), OMP_NUM_THREADS="1"), capture_output=True,
        text=True, timeout=300,
    )
    assert_one_line_error(proc, "Hugging Face Hub is unreachable", "'HuggingFaceTB/SmolLM-135M'",
                          "--model_name_or_path /path/to/model", "--data_files /path/to/docs.jsonl")
    assert "retry" not in proc.stderr.lower() and "Retrying" not in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_eval_with_the_hub_offline_names_its_own_flags(adapter_dir, tmp_path, capsys, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "the cat"}) + "\n")
    line = _main_error(capsys, "eval", "--adapter", str(adapter_dir), "--model", "HuggingFaceTB/SmolLM-135M",
                       "--data-files", str(tmp_path / "docs.jsonl"))
    assert "Hub is unreachable (HF_HUB_OFFLINE is set)" in line and "--model /path/to/model" in line
    line = _main_error(capsys, "eval", "--adapter", str(adapter_dir), "--model", "/no/such/model",
                       "--data-files", str(tmp_path / "docs.jsonl"))
    assert "--model '/no/such/model': no such local path" in line
