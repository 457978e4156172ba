"""``recipes/retrieval-tiny.yaml`` from the command line, offline, on a backbone laid out as ``hmt-adapter demo``
writes it; and the invariants of its data (``recipes/data/passkey.py``)."""

from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest
import torch

from hmt_adapter import HMTConfig
from hmt_adapter.testing import tiny_tokenizer

REPO = os.path.join(os.path.dirname(__file__), os.pardir)
RECIPE = os.path.abspath(os.path.join(REPO, "recipes", "retrieval-tiny.yaml"))
DATA = os.path.join(REPO, "recipes", "data")


def _passkey():
    spec = importlib.util.spec_from_file_location("passkey_recipe_data", os.path.join(DATA, "passkey.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


passkey = _passkey()


@pytest.fixture
def demo_layout(tmp_path, monkeypatch):
    """A working directory holding ``hmt-demo-output/backbone`` as the demo saves it (model + tokenizer), with a
    smaller, unpretrained backbone: the test checks the recipe runs, not what it learns."""
    from hmt_adapter_cli.demo import DemoSettings, build_backbone

    tokenizer = tiny_tokenizer()
    backbone = build_backbone(DemoSettings(hidden_size=32, num_heads=2), len(tokenizer))
    folder = tmp_path / "hmt-demo-output" / "backbone"
    backbone.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_retrieval_recipe_trains_from_the_command_line_offline(demo_layout, capsys):
    from hmt_adapter_cli.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model runs fastest on one thread
    try:
        code = main(["train", RECIPE, "--stage2_max_steps", "3", "--per_device_train_batch_size", "4",
                     "--logging_steps", "1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    out = demo_layout / "outputs" / "retrieval-tiny"
    assert (out / "adapter_model.safetensors").is_file()
    config = HMTConfig.from_pretrained(str(out))
    assert config.use_recall and config.write_token == "learned" and not config.memory_gate and config.segment_length == 16
    assert config.recall_null  # the recipe's do-no-harm half, with the decoy rows of its data
    printed = capsys.readouterr().out
    assert "prompt/completion, one stage with recall: 3 logged steps" in printed and "stage1" not in printed
    card = (out / "README.md").read_text()
    assert "curriculum over input lengths: from 2 segments" in card
    # the recipe's own report: the adapter against the backbone alone on held-out rows, by length
    result = passkey.accuracy(str(out), None, examples=4, seed=0)
    assert set(result) == {"1x", "2x", "4x", "8x", "16x", "8x last", "8x last, decoy", "8x border", "8x last, border"}
    assert all(0.0 <= r[k] <= 1.0 for r in result.values() for k in ("backbone", "hmt"))


@pytest.mark.parametrize("segments, in_last", [(1, True), (2, True), (2, False), (5, False), (8, True), (8, False)])
def test_rows_fill_whole_segments_with_the_key_where_asked(segments, in_last):
    tokenizer, task, words = passkey._task()
    rng = random.Random(segments)
    for _ in range(50):
        row = passkey.passkey_row(task, words, segments, in_last, rng)
        prompt = tokenizer(row["prompt"], add_special_tokens=False).input_ids
        (key,) = tokenizer(row["completion"], add_special_tokens=False).input_ids
        assert len(prompt) + 2 == segments * passkey.SEGMENT_LENGTH  # + the key and TRL's EOS
        assert prompt[-1] == task.query_id
        (position,) = [i for i, t in enumerate(prompt) if t in task.key_ids]
        assert prompt[position] == key
        last = (segments - 1) * passkey.SEGMENT_LENGTH
        if in_last:
            assert position >= last
        else:  # out of the backbone's window and of the sensory tokens carried into the last segment
            assert position < last - passkey.NUM_SENSORY


def test_training_rows_spread_the_key_and_put_a_quarter_in_the_last_segment():
    tokenizer, task, _ = passkey._task()
    rows = passkey.training_rows(800, 8, 0.25, seed=0)
    in_last, segments_used = 0, set()
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False).input_ids
        (position,) = [i for i, t in enumerate(prompt) if t in task.key_ids]
        segment, count = position // passkey.SEGMENT_LENGTH, (len(prompt) + 2) // passkey.SEGMENT_LENGTH
        in_last += segment == count - 1
        segments_used.add(segment)
    assert 0.2 < in_last / len(rows) < 0.3
    assert segments_used == set(range(8))


def test_decoy_rows_answer_the_key_in_the_window_with_another_key_beyond_it():
    tokenizer, task, words = passkey._task()
    rows = passkey.training_rows(400, 8, 1.0, seed=0, decoy_fraction=0.5)
    decoys = 0
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False).input_ids
        (key,) = tokenizer(row["completion"], add_special_tokens=False).input_ids
        keys = [i for i, t in enumerate(prompt) if t in task.key_ids]
        last = (len(prompt) + 2) // passkey.SEGMENT_LENGTH - 1
        assert prompt[keys[-1]] == key and keys[-1] // passkey.SEGMENT_LENGTH == last  # the answer: in the window
        if len(keys) == 2:
            decoys += 1
            assert prompt[keys[0]] != key and keys[0] < last * passkey.SEGMENT_LENGTH - passkey.NUM_SENSORY
        else:
            assert len(keys) == 1
    assert 0.4 < decoys / len(rows) < 0.6
    with pytest.raises(ValueError, match="decoy goes beyond the window"):
        passkey.passkey_row(task, words, 4, False, random.Random(0), decoy=True)


@pytest.mark.parametrize("in_last", [True, False])
def test_border_rows_end_the_prompt_just_past_a_segment_border(in_last):
    tokenizer, task, words = passkey._task()
    rng, L = random.Random(7), passkey.SEGMENT_LENGTH
    for border in range(1, 9):
        row = passkey.passkey_row(task, words, 5, in_last, rng, border=border)
        prompt = tokenizer(row["prompt"], add_special_tokens=False).input_ids
        (key,) = tokenizer(row["completion"], add_special_tokens=False).input_ids
        assert len(prompt) == 5 * L + border and prompt[-1] == task.query_id  # the query mark: the border's token
        (position,) = [i for i, t in enumerate(prompt) if t in task.key_ids]
        assert prompt[position] == key
        if in_last:  # in the backbone's window (the last L prompt tokens), not the query mark
            assert len(prompt) - L <= position < len(prompt) - 1
        else:  # out of the last whole segment, the window and the sensory tokens carried into them
            assert position < 4 * L - passkey.NUM_SENSORY
    with pytest.raises(ValueError, match="border"):
        passkey.passkey_row(task, words, 5, False, rng, border=9)


def test_training_rows_end_a_share_of_prompts_past_a_border():
    tokenizer, _, _ = passkey._task()
    lengths = [len(tokenizer(r["prompt"], add_special_tokens=False).input_ids)
               for r in passkey.training_rows(400, 8, 0.25, seed=0, decoy_fraction=0.5, border_fraction=0.5)]
    past = [n % passkey.SEGMENT_LENGTH for n in lengths if (n + 2) % passkey.SEGMENT_LENGTH]
    assert all(1 <= offset <= 8 for offset in past)  # the query mark among a segment's first 8 tokens
    assert 0.3 < len(past) / len(lengths) < 0.5  # half of the rows of 3+ segments (6 of 7 draws)


def test_the_shipped_rows_are_what_the_script_writes(tmp_path):
    shipped = os.path.join(DATA, "passkey_train.jsonl")
    assert os.path.getsize(shipped) < 1_000_000
    passkey.main(["write", "--output", str(tmp_path / "rows.jsonl")])
    assert (tmp_path / "rows.jsonl").read_text() == open(shipped).read()
    assert all(set(json.loads(line)) == {"prompt", "completion"} for line in open(shipped))


def test_a_backbone_folder_without_its_tokenizer_is_a_one_line_error(demo_layout):
    from hmt_adapter_cli.recipes import parse_recipe, run_recipe

    folder = demo_layout / "hmt-demo-output" / "backbone"
    for name in os.listdir(folder):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            os.remove(folder / name)
    with pytest.raises(ValueError, match=r"holds no tokenizer .* run `hmt-adapter demo` again"):
        run_recipe(*parse_recipe(RECIPE, ["--stage2_max_steps", "1"]))


def test_recipe_write_token_init_text_starts_w_at_the_prompts_last_token_with_the_recipes_tokenizer(demo_layout):
    """write_token_init_text in a recipe: tokenized with the recipe's own tokenizer (the backbone folder); with a
    zero learning rate the saved write token is exactly that token's input embedding."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hmt_adapter_cli.cli import main

    code = main(["train", RECIPE, "--stage2_max_steps", "1", "--per_device_train_batch_size", "2",
                 "--learning_rate", "0", "--warmup_steps", "0", "--write_token_init_text", "?"])
    assert code == 0
    out = demo_layout / "outputs" / "retrieval-tiny"
    config = HMTConfig.from_pretrained(str(out))
    folder = demo_layout / "hmt-demo-output" / "backbone"
    assert config.write_token_init_text == "?" and os.path.samefile(config.tokenizer_name_or_path, folder)
    (w,) = [v for k, v in load_file(str(out / "adapter_model.safetensors")).items() if "hmt_write_token" in k]
    embeddings = AutoModelForCausalLM.from_pretrained(str(folder)).get_input_embeddings().weight
    assert torch.equal(w, embeddings[tiny_tokenizer()("?", add_special_tokens=False).input_ids[-1]])


def test_recipe_write_token_init_text_on_a_testing_backbone_without_a_tokenizer_is_refused(tmp_path):
    from hmt_adapter_cli.recipes import parse_recipe

    with pytest.raises(ValueError, match="needs a tokenizer on disk or on the Hub"):
        parse_recipe(None, ["--model_name_or_path", "hmt-testing:llama", "--output_dir", str(tmp_path),
                            "--dataset_name", "x", "--write_token_init_text", "?"])


def test_recipe_write_token_init_text_auto_starts_w_at_the_prompts_most_common_last_token(demo_layout, capsys):
    """``write_token_init_text: auto``: `hmt-adapter train` finds the text from the prompts (the shipped passkey rows
    all end in '?'), says so in one line, saves it in the adapter's config, and starts w at that token."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hmt_adapter_cli.cli import main

    code = main(["train", RECIPE, "--stage2_max_steps", "1", "--per_device_train_batch_size", "2",
                 "--learning_rate", "0", "--warmup_steps", "0", "--write_token_init_text", "auto"])
    assert code == 0
    assert "write_token_init_text: auto -> " in capsys.readouterr().out
    out = demo_layout / "outputs" / "retrieval-tiny"
    config = HMTConfig.from_pretrained(str(out))
    question = tiny_tokenizer()("?", add_special_tokens=False).input_ids[-1]
    assert tiny_tokenizer()(config.write_token_init_text, add_special_tokens=False).input_ids[-1] == question
    (w,) = [v for k, v in load_file(str(out / "adapter_model.safetensors")).items() if "hmt_write_token" in k]
    folder = demo_layout / "hmt-demo-output" / "backbone"
    assert torch.equal(w, AutoModelForCausalLM.from_pretrained(str(folder)).get_input_embeddings().weight[question])


def test_write_token_init_text_auto_on_text_documents_is_a_one_line_error(tmp_path):
    from hmt_adapter_cli.recipes import parse_recipe, run_recipe

    tiny = os.path.join(REPO, "recipes", "tiny-offline.yaml")
    with pytest.raises(ValueError, match="auto starts the write token at the prompts' last token"):
        run_recipe(*parse_recipe(tiny, ["--output_dir", str(tmp_path), "--write_token_init_text", "auto",
                                        "--tokenizer_name_or_path", str(tmp_path)]))


def test_prompt_end_text_finds_the_most_common_ending_and_says_how_common():
    from hmt_adapter_cli.prompt_completion import prompt_end_text

    tok = tiny_tokenizer()
    prompts = ["the key is 7. what is the key?", "a b c. what is the key?", "x y. the word is"]
    text, share = prompt_end_text(prompts, tok)
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[-1] == tok("?", add_special_tokens=False).input_ids[-1] and share == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="found no prompt with a token"):
        prompt_end_text(["", ""], tok)
