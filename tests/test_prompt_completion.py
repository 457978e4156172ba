"""Prompt/completion training (`hmt_adapter_cli.prompt_completion`): completion-only loss on whole rows, the curriculum
the trainer really reads, one-line data errors (that the long-context benchmark trains through the same code:
benchmarks/tests/test_long_context.py)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from datasets import Dataset
from trl import SFTConfig

from hmt_adapter import HMTConfig
from hmt_adapter.testing import tiny_causal_lm, tiny_tokenizer
from hmt_adapter.integrations.trl import curriculum_order
from hmt_adapter_cli import prompt_completion as P
from hmt_adapter_cli.recipes import parse_recipe, run_recipe

SEGMENT = 8
WORDS = "the cat sees a dog and the king reads a book in the house".split()


def rows(lengths: list[int]) -> Dataset:
    """Prompts of ``n`` words (``n`` tokens with the tiny word-level tokenizer), each answered by one word."""
    prompts = [" ".join(WORDS[i % len(WORDS)] for i in range(n)) for n in lengths]
    return Dataset.from_dict({"prompt": prompts, "completion": [" moon"] * len(lengths)})


def sft_args(tmp_path, **overrides) -> SFTConfig:
    kwargs = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                  report_to="none", use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
                  dataloader_num_workers=0, seed=0)
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def hmt_model():
    return peft.get_peft_model(tiny_causal_lm("llama"), HMTConfig(task_type="CAUSAL_LM", segment_length=SEGMENT,
                                                                  num_sensory=2, recall_dim=8))


class Recorder:
    """Wraps the model's forward: the labels of every training batch, in order."""

    def __init__(self, model) -> None:
        self.labels: list[torch.Tensor] = []
        self.input_ids: list[torch.Tensor] = []
        forward = model.forward

        def recording(*args, **kwargs):
            self.labels.append(kwargs["labels"].detach().clone())
            self.input_ids.append(kwargs["input_ids"].detach().clone())
            return forward(*args, **kwargs)

        model.forward = recording


def test_loss_is_on_the_completion_only_and_rows_are_never_cut(tmp_path):
    tokenizer = tiny_tokenizer()
    data = rows([40, 12])  # 40 words: longer than the max_length we pass, and 5 segments of 8
    model = hmt_model()
    seen = Recorder(model)
    P.train_prompt_completion(model, data, tokenizer, sft_args(tmp_path, max_steps=1, max_length=None))
    (labels,), (ids,) = seen.labels, seen.input_ids
    moon, eos = tokenizer.convert_tokens_to_ids("moon"), tokenizer.eos_token_id
    for row_ids, row_labels in zip(ids, labels):
        scored = row_labels[row_labels != -100].tolist()
        assert scored == [moon, eos]  # the completion (and TRL's EOS), nothing of the prompt
    assert sorted((l != tokenizer.pad_token_id).sum().item() for l in ids) == [12 + 2, 40 + 2]  # whole rows
    with pytest.raises(ValueError, match="longer than max_length=16"):  # a max_length is checked, never applied
        P.train_prompt_completion(hmt_model(), data, tokenizer, sft_args(tmp_path, max_length=16))


def test_without_completion_eos_rows_end_with_the_completion(tmp_path):
    tokenizer = tiny_tokenizer()
    model = hmt_model()
    seen = Recorder(model)
    P.train_prompt_completion(model, rows([20, 12]), tokenizer, sft_args(tmp_path, max_steps=1, max_length=None),
                              completion_eos=False)
    moon = tokenizer.convert_tokens_to_ids("moon")
    assert [row[row != -100].tolist() for row in seen.labels[0]] == [[moon], [moon]]
    assert sorted((row != tokenizer.pad_token_id).sum().item() for row in seen.input_ids[0]) == [13, 21]


def test_tokenized_rows_with_a_completion_mask_score_the_mask_only(tmp_path):
    """The benchmark's format: TRL's completion_only_loss defaults to False for it; the shared code makes it True."""
    ids = [[5 + i % 20 for i in range(30)]] * 2
    data = Dataset.from_dict({"input_ids": ids, "completion_mask": [[0] * 29 + [1]] * 2})
    model = hmt_model()
    seen = Recorder(model)
    P.train_prompt_completion(model, data, tiny_tokenizer(), sft_args(tmp_path, max_steps=1, max_length=None))
    assert [(l != -100).sum().item() for l in seen.labels[0]] == [1, 1]


def test_the_trainer_reads_the_rows_in_curriculum_order(tmp_path):
    """Rows of 1..6 segments; the run reads 12 rows (6 steps x batch 2): the data repeated, then ordered by
    curriculum_order, which is exactly the order of the batches the model receives."""
    lengths = [SEGMENT * k - 3 for k in (6, 1, 5, 2, 4, 3)]  # + completion + EOS: k segments minus 1 token
    data = rows(lengths)
    model = hmt_model()
    seen = Recorder(model)
    curriculum = P.Curriculum(min_segments=1, ramp_fraction=0.5)
    args = sft_args(tmp_path, max_steps=6, max_length=None, seed=3)
    P.train_prompt_completion(model, data, tiny_tokenizer(), args, curriculum=curriculum)
    tokens = [n + 2 for n in lengths]
    expected = P.curriculum_rows(tokens, 12, SEGMENT, curriculum, seed=3)
    run = P.run_rows(6, 12, 3)
    assert expected == [run[i] for i in curriculum_order([tokens[r] for r in run], SEGMENT, 1, 0.5, 3)]
    read = [int((row != 0).sum()) for batch in seen.input_ids for row in batch]
    assert read == [tokens[i] for i in expected]
    assert sorted(expected) == sorted(list(range(6)) * 2)  # every row twice: the data repeated for the run
    first_half = read[:6]
    assert max(first_half) < max(read)  # short inputs first
    assert read != sorted(read, key=lambda n: -n)  # not the data's order reversed by accident
    assert read[:2] != [tokens[0], tokens[1]]  # not the data's own order


def test_curriculum_rows_sample_the_data_for_a_short_run():
    order = P.curriculum_rows([SEGMENT * k for k in range(1, 11)], 4, SEGMENT, P.Curriculum(), seed=0)
    assert len(order) == 4 and len(set(order)) == 4


@pytest.mark.parametrize("bad, message", [
    ({"min_segments": 0}, "curriculum_min_segments must be an integer >= 1, got 0"),
    ({"ramp_fraction": 0.0}, r"curriculum_ramp_fraction must be in \(0, 1\], got 0.0"),
    ({"ramp_fraction": 1.5}, r"curriculum_ramp_fraction must be in \(0, 1\], got 1.5"),
])
def test_bad_curriculum_values_name_the_recipe_field(bad, message):
    with pytest.raises(ValueError, match=message):
        P.Curriculum(**bad)


# ---- data errors: one line, naming the row and what to change ---------------------------------------------------
def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def recipe_args(tmp_path, data_file: str, *extra: str):
    return parse_recipe(None, ["--model_name_or_path", "hmt-testing:llama", "--data_files", data_file,
                               "--output_dir", str(tmp_path / "out"), "--segment_length", str(SEGMENT),
                               "--recall_dim", "8", "--num_sensory", "2", *extra])


@pytest.mark.parametrize("records, message", [
    ([{"prompt": "the cat", "completion": " dog"}, {"prompt": "a king", "completion": ""}],
     r"row 2 has an empty 'completion'"),
    ([{"prompt": "the cat", "completion": " dog"}, {"prompt": "a king"}], r"row 2 has no 'completion'"),
    ([{"prompt": "the cat", "completion": " dog"}, {"completion": " dog"}], r"row 2 has no 'prompt'"),
    ([{"prompt": "the cat", "completion": 3}], r"row 1 has a 'completion' that is neither text nor"),
    ([{"prompt": "the cat"}], r"has no 'completion' column \(columns: \['prompt'\]\)"),
])
def test_bad_rows_are_one_line_errors_before_any_training(tmp_path, records, message):
    data = write_jsonl(tmp_path / "qa.jsonl", records)
    with pytest.raises(ValueError, match=message) as err:
        run_recipe(*recipe_args(tmp_path, data))
    assert "\n" not in str(err.value) and "qa.jsonl" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_bad_curriculum_value_in_a_recipe_is_refused_before_loading(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "the cat", "completion": " dog"}])
    with pytest.raises(ValueError, match=r"^curriculum_ramp_fraction must be in \(0, 1\], got 0.0.$"):
        recipe_args(tmp_path, data, "--curriculum", "true", "--curriculum_ramp_fraction", "0")


def test_explicit_prompt_completion_format_needs_its_columns(tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": "the cat sees the dog"}])
    with pytest.raises(ValueError, match="has no 'prompt' column"):
        run_recipe(*recipe_args(tmp_path, data, "--data_format", "prompt_completion"))


def test_curriculum_on_text_documents_says_what_to_change(tmp_path):
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": "the cat sees the dog"}])
    with pytest.raises(ValueError, match="set curriculum: false, or train on prompt/completion rows"):
        run_recipe(*recipe_args(tmp_path, data, "--curriculum", "true"))


def test_recipe_on_prompt_completion_rows_trains_one_stage_with_recall(tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": " ".join(WORDS * (1 + i % 3)) + " ?", "completion": " dog"}
                                               for i in range(6)])
    args = recipe_args(tmp_path, data, "--stage2_max_steps", "2", "--per_device_train_batch_size", "2",
                       "--curriculum", "true", "--report_to", "none", "--logging_steps", "1", "--save_strategy", "no",
                       "--disable_tqdm", "true")
    assert args[4].max_length is None  # the recipe left it out: rows are never cut
    report = run_recipe(*args)
    assert "stage1" not in report and "stage2" not in report
    assert len(report["prompt_completion"]["losses"]) == 2 and report["prompt_completion"]["curriculum"]
    assert HMTConfig.from_pretrained(str(tmp_path / "out")).use_recall
    card = (tmp_path / "out" / "README.md").read_text()
    assert "loss on the completion only" in card and "curriculum over input lengths" in card

