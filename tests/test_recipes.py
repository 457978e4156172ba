"""Recipes: YAML parsing, the paper's settings, the two-stage runner on the tiny offline recipe, stage-1 loading."""

from __future__ import annotations

import os

import peft
import pytest
import torch
from safetensors.torch import load_file

from hmt_adapter import HMTConfig
from hmt_adapter_cli.recipes import HMTArguments, hmt_config, parse_recipe, run_recipe
from hmt_adapter.testing import tiny_causal_lm
from hmt_adapter.integrations.trl import load_stage1_weights

RECIPES = os.path.join(os.path.dirname(__file__), os.pardir, "recipes")
TINY = os.path.join(RECIPES, "tiny-offline.yaml")


def recipe(name: str) -> str:
    return os.path.join(RECIPES, name)


@pytest.mark.parametrize(
    "name, segment_length, four_bit",
    [("opt-350m-wikitext103.yaml", 1024, False), ("llama2-7b-pg19-4bit.yaml", 256, True), ("smollm-135m.yaml", 1024, False)],
)
def test_paper_recipes_parse_with_the_paper_settings(name, segment_length, four_bit):
    # SFTConfig turns bf16 on and refuses it on a machine without a GPU unless use_cpu is set
    model, data, hmt, stage, sft = parse_recipe(recipe(name), ["--use_cpu", "true"])
    assert "/" in model.model_name_or_path and model.load_in_4bit is four_bit
    assert hmt.segment_length == segment_length and hmt.num_sensory == 32
    assert (stage.stage1_segments, stage.stage1_max_steps, stage.stage2_max_steps) == (2, 200, 500)
    assert stage.stage2_segments > stage.stage1_segments
    assert (stage.lr_decay_steps, stage.lr_decay_factor) == (100, 0.9)
    assert data.dataset_name and sft.output_dir
    hmt_config(hmt, use_recall=True)  # a valid HMTConfig


def test_local_paths_and_overrides(tmp_path):
    model, data, hmt, stage, sft = parse_recipe(TINY, ["--segment_length", "4", "--output_dir", str(tmp_path)])
    assert os.path.isfile(data.data_files)  # resolved against the recipe's directory
    assert hmt.segment_length == 4 and sft.output_dir == str(tmp_path)
    model, *_ = parse_recipe(recipe("smollm-135m.yaml"), ["--model_name_or_path", "/models/SmolLM-135M", "--use_cpu", "true"])
    assert model.model_name_or_path == "/models/SmolLM-135M"


def test_hmt_arguments_are_hmtconfig_fields_with_its_defaults_and_help():
    import dataclasses

    config_fields = {f.name: f for f in dataclasses.fields(HMTConfig)}
    for f in dataclasses.fields(HMTArguments):
        assert f.default == config_fields[f.name].default
        assert f.metadata["help"] == config_fields[f.name].metadata["help"]
    names = {f.name for f in dataclasses.fields(HMTArguments)}
    assert {"segment_length", "num_sensory", "recall_query", "loss_scope", "lora_r", "bptt_depth"} <= names
    assert not names & {"peft_type", "task_type", "use_recall", "base_embedding_dim", "target_modules"}


def test_hmt_fields_read_from_the_source_are_hmtconfigs_own():
    """`hmt_adapter_cli.arguments` reads HMTConfig's fields from config.py's source (so `train --help` needs no
    torch): exactly the fields HMTConfig declares beyond PeftConfig's, with their types, defaults and help."""
    import dataclasses
    import typing

    from hmt_adapter_cli.arguments import hmt_config_fields

    peft_names = {f.name for f in dataclasses.fields(peft.PeftConfig)}
    hints = typing.get_type_hints(HMTConfig)
    own = [f for f in dataclasses.fields(HMTConfig) if f.name not in peft_names]
    read = hmt_config_fields()
    assert [name for name, _, _ in read] == [f.name for f in own]
    for (name, kind, spec), f in zip(read, own):
        assert kind == hints[name], name
        assert spec.default == f.default and dict(spec.metadata) == dict(f.metadata), name


def test_relative_paths_in_a_recipe_resolve_against_its_folder_and_flags_against_the_working_directory(
        tmp_path, monkeypatch):
    recipes, work = tmp_path / "recipes", tmp_path / "work"
    (recipes / "data").mkdir(parents=True)
    work.mkdir()
    (recipes / "data" / "docs.jsonl").write_text('{"text": "the cat"}\n')
    (work / "mine.jsonl").write_text('{"text": "the dog"}\n')
    (recipes / "r.yaml").write_text("model_name_or_path: hmt-testing:llama\ndata_files: data/docs.jsonl\n"
                                    "output_dir: out/run\nstage1_adapter: s1\n")
    (recipes / "plain.yaml").write_text("model_name_or_path: hmt-testing:llama\ndata_files: data/docs.jsonl\n")
    monkeypatch.chdir(work)
    _, data, _, stage, sft = parse_recipe(str(recipes / "r.yaml"))
    assert data.data_files == str(recipes / "data" / "docs.jsonl")
    assert sft.output_dir == str(recipes / "out" / "run") and stage.stage1_adapter == str(recipes / "s1")
    _, data, _, _, sft = parse_recipe(str(recipes / "r.yaml"), ["--data_files", "mine.jsonl", "--output-dir", "here"])
    assert (data.data_files, sft.output_dir) == ("mine.jsonl", "here")  # flags: the working directory
    _, _, _, _, sft = parse_recipe(str(recipes / "plain.yaml"))
    assert sft.output_dir == os.path.join("outputs", "plain")  # no output_dir: outputs/<recipe name>/ here


def test_config_flag_form_resolves_paths_as_the_positional_form():
    from hmt_adapter_cli.recipes import recipe_and_overrides

    assert recipe_and_overrides(["--config", TINY, "--seed", "1"]) == (TINY, ["--seed", "1"])
    assert recipe_and_overrides([f"--config={TINY}"]) == (TINY, [])
    assert recipe_and_overrides([TINY, "--seed", "1"]) == (TINY, ["--seed", "1"])


def test_bad_hmt_value_reads_as_the_api_error():
    with pytest.raises(ValueError, match=r"^HMTConfig.segment_length must be >= 1, got -4.$"):
        parse_recipe(TINY, ["--segment_length", "-4"])


def test_unknown_recipe_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: hmt-testing:llama\nsegment_lenght: 8\noutput_dir: x\n")
    with pytest.raises(ValueError, match="segment_lenght"):
        parse_recipe(str(bad))


def test_cli_train_reports_recipe_errors_without_a_traceback(tmp_path, capsys):
    from hmt_adapter_cli.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: hmt-testing:llama\nsegment_lenght: 8\noutput_dir: x\n")
    with pytest.raises(SystemExit) as exc:
        main(["train", str(bad)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "segment_lenght" in err and "Traceback" not in err


def test_tiny_recipe_runs_both_stages(tmp_path):
    args = parse_recipe(TINY, ["--output_dir", str(tmp_path)])
    report = run_recipe(*args)
    stage1 = load_file(str(tmp_path / "stage1" / "adapter_model.safetensors"))
    final = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not any("recall" in k or "summary" in k for k in stage1)  # stage 1: use_recall=False
    assert any("hmt_recall_q" in k for k in final) and set(stage1) < set(final)
    assert len(report["stage2_init"]["fresh_recall_params"]) == 3
    assert HMTConfig.from_pretrained(str(tmp_path)).use_recall
    assert len(report["stage1"]["losses"]) == 3 and len(report["stage2"]["losses"]) == 3
    # stage 2 started from the trained stage-1 weights, not from a fresh init
    key = next(k for k in stage1 if k.endswith("hmt_memory_init"))
    fresh = peft.get_peft_model(tiny_causal_lm("llama"), hmt_config(args[2], use_recall=True))
    fresh_init = fresh.base_model.hmt_layer().hmt_memory_init["default"].detach()
    assert not torch.equal(stage1[key], fresh_init)


def test_step_decay_schedule(tmp_path):
    from hmt_adapter_cli.recipes import _step_decay_trainer_cls
    from test_trl import hmt_config, pattern_dataset, sft_args
    from hmt_adapter.testing import tiny_tokenizer

    trainer = _step_decay_trainer_cls()(
        model=tiny_causal_lm("llama"), peft_config=hmt_config(use_recall=False),
        args=sft_args(tmp_path, max_steps=5, learning_rate=1.0, warmup_steps=0, per_device_train_batch_size=1),
        train_dataset=pattern_dataset(rows=2, repeats=1), processing_class=tiny_tokenizer(), decay_steps=2, decay_factor=0.5,
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=5)
    lrs = []
    for _ in range(5):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs == [1.0, 1.0, 0.5, 0.5, 0.25]


def _stage_models(**stage2):
    stage1 = peft.get_peft_model(tiny_causal_lm("llama"), HMTConfig(task_type="CAUSAL_LM", segment_length=8, use_recall=False))
    with torch.no_grad():
        stage1.base_model.hmt_layer().hmt_memory_init["default"].add_(1.0)
    kwargs = dict(task_type="CAUSAL_LM", segment_length=8, recall_dim=8)
    kwargs.update(stage2)
    return stage1, peft.get_peft_model(tiny_causal_lm("llama", seed=1), HMTConfig(**kwargs))


def test_load_stage1_weights(tmp_path):
    stage1, stage2 = _stage_models()
    stage1.save_pretrained(tmp_path / "s1")
    recall_before = stage2.base_model.hmt_layer().hmt_recall_q["default"].weight.detach().clone()
    result = load_stage1_weights(stage2, tmp_path / "s1")
    layer1, layer2 = stage1.base_model.hmt_layer(), stage2.base_model.hmt_layer()
    assert torch.equal(layer1.hmt_memory_init["default"], layer2.hmt_memory_init["default"])
    assert torch.equal(layer1.hmt_memory_proj["default"].weight, layer2.hmt_memory_proj["default"].weight)
    assert torch.equal(layer2.hmt_recall_q["default"].weight, recall_before)  # fresh, as expected
    assert sorted(k.split(".")[-2 if k.endswith("weight") else -1] for k in result.missing_recall) == [
        "hmt_recall_k", "hmt_recall_q", "hmt_summary_token"
    ]
    assert len(result.loaded) == 3  # m_0, the learned write token w, the memory projection


def test_load_stage1_weights_rejects_mismatches_before_loading(tmp_path):
    stage1, stage2 = _stage_models(lora_r=2)  # stage 2 has LoRA, stage 1 has not
    before = {n: p.detach().clone() for n, p in stage2.named_parameters()}
    with pytest.raises(ValueError, match="lora_r"):
        load_stage1_weights(stage2, stage1.save_pretrained(tmp_path / "s1") or tmp_path / "s1")
    assert all(torch.equal(before[n], p) for n, p in stage2.named_parameters())  # nothing half-loaded
    stage1, stage2 = _stage_models(memory_projection=False)
    with pytest.raises(ValueError, match="keys the stage-2 model does not have"):
        load_stage1_weights(stage2, peft.get_peft_model_state_dict(stage1))
    with pytest.raises(ValueError, match="No stage-1 adapter weights"):
        load_stage1_weights(stage2, tmp_path / "missing")
