"""Smoke test of `hmt-adapter demo` (hmt_adapter_cli/demo.py) with tiny settings, plus its task's invariants."""

from __future__ import annotations

import json
import os
import random

import pytest

pytest.importorskip("trl")
pytest.importorskip("matplotlib")

import torch  # noqa: E402

from hmt_adapter_cli.demo import DemoSettings, PasskeyTask, make_parser, run_demo, settings_from_args  # noqa: E402
from hmt_adapter.testing import tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def task() -> PasskeyTask:
    return PasskeyTask.from_tokenizer(tiny_tokenizer(), num_keys=16)


def test_task_vocabulary_is_disjoint(task: PasskeyTask) -> None:
    assert len(set(task.key_ids)) == 16
    assert not set(task.key_ids) & set(task.filler_ids)
    assert task.query_id not in task.key_ids and task.query_id not in task.filler_ids


@pytest.mark.parametrize("multiple", [1, 2, 4, 8])
def test_long_examples_hide_the_key_from_the_last_window(task: PasskeyTask, multiple: int) -> None:
    """Beyond 1x the key must lie outside the backbone's window and the sensory tokens HMT carries over a
    border, so only memory can bring it to the query; the answer is the last token, after the query mark."""
    settings = DemoSettings()
    rng = random.Random(0)
    window, sensory = settings.segment_length, settings.num_sensory
    for _ in range(200):
        ids, key = task.long_example(multiple, settings, rng)
        assert len(ids) == multiple * window
        assert ids[-2] == task.query_id and ids[-1] == key
        positions = [i for i, t in enumerate(ids[:-1]) if t in task.key_ids]
        assert len(positions) == 1 and ids[positions[0]] == key
        if multiple > 1:
            assert positions[0] < len(ids) - window - sensory


@pytest.fixture
def one_thread():
    """The tiny model runs fastest on one thread (and the suite may share the CPU); restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_demo_pipeline_end_to_end_and_reloads_identically(tmp_path, one_thread, capsys) -> None:
    """The whole demo (pretrain, HMT via SFTTrainer, evaluation, save, reload, plot) with tiny settings."""
    out = tmp_path / "demo"
    settings = DemoSettings(
        output_dir=str(out), hidden_size=32, num_heads=2, segment_length=8, num_sensory=2, recall_dim=8,
        pretrain_steps=4, pretrain_batch=8, hmt_steps=2, hmt_batch=4, train_segments=(2, 4),
        multiples=(1, 2, 4), eval_examples=8, eval_batch=8,
    )
    results = run_demo(settings)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    for name in ("backbone", "hmt"):
        assert set(results["accuracy"][name]) == {"1", "2", "4"}
        assert all(0.0 <= a <= 1.0 for a in results["accuracy"][name].values())
    assert results["reload_identical"] and results["reload_max_abs_diff"] == 0.0
    assert results["adapter_weights_only"]
    assert results["hmt_train_log"], "SFTTrainer logged no training loss"
    assert (out / "accuracy.png").stat().st_size > 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "HMT" and config["segment_length"] == 8
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    # it says where everything goes, first, and leaves nothing else (no empty trainer/ folder)
    console = capsys.readouterr()
    assert f"writing results.json, accuracy.png, backbone/ and adapter/ to {out}" in console.out.splitlines()[0]
    # a quiet console: the demo's own lines, no trainer log dicts, no progress bars
    assert not any(line.startswith("{'") for line in console.out.splitlines()), console.out
    assert "it/s" not in console.err + console.out and "examples/s" not in console.err + console.out, console.err
    assert any("HMT trained: loss" in line for line in console.out.splitlines())
    assert sorted(os.listdir(out)) == ["accuracy.png", "adapter", "backbone", "results.json"]
    # backbone/ is a complete model folder (with its tokenizer): recipes/retrieval-tiny.yaml trains on it
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(out / "backbone"))
    assert saved.get_vocab() == tiny_tokenizer().get_vocab() and saved.eos_token == "</s>"


def test_command_line_arguments_reach_the_settings() -> None:
    args = make_parser().parse_args(["--output-dir", "x", "--seed", "3", "--pretrain-steps", "5", "--hmt-steps", "7",
                                     "--eval-examples", "9"])
    settings = settings_from_args(args)
    assert (settings.output_dir, settings.seed, settings.pretrain_steps, settings.hmt_steps,
            settings.eval_examples) == ("x", 3, 5, 7, 9)
    assert args.threads == 1
