"""A saved HMT adapter carries a real model card: base model, HMT settings, the import line, training, results."""

from __future__ import annotations

import peft
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from hmt_adapter import HMTConfig
from hmt_adapter.tuner.model_card import write_model_card
from hmt_adapter.testing import tiny_causal_lm


def test_saved_adapter_card_names_base_settings_and_import(tmp_path) -> None:
    tiny_causal_lm("llama").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = peft.get_peft_model(base, HMTConfig(segment_length=8, num_sensory=2, recall_dim=8, lora_r=2))
    model.save_pretrained(tmp_path / "adapter")
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    assert card.data.base_model == str(tmp_path / "base")
    assert card.data.library_name == "peft" and "hmt" in card.data.tags
    text = card.text
    # loading needs the package installed (it registers HMT with PEFT on import of peft), not an import line
    assert "pip install hmt-adapter" in text and text.index("pip install hmt-adapter") < text.index("PeftModel.from_pretrained")
    assert "| `segment_length` | `8` |" in text and "| `lora_r` | `2` |" in text
    assert "## Training" in text and "## Results" in text


def test_named_adapter_gets_its_own_card_and_local_backbone_has_no_empty_base(tmp_path) -> None:
    model = peft.get_peft_model(tiny_causal_lm("llama"), HMTConfig(segment_length=8, recall_dim=8))
    model.add_adapter("other", HMTConfig(segment_length=16, recall_dim=8))
    model.save_pretrained(tmp_path)
    top, other = ModelCard.load(tmp_path / "README.md"), ModelCard.load(tmp_path / "other" / "README.md")
    assert "| `segment_length` | `8` |" in top.text and "| `segment_length` | `16` |" in other.text
    assert not top.data.base_model and "base_model:adapter:" not in (top.data.tags or [])


def test_training_and_results_can_be_recorded(tmp_path) -> None:
    config = HMTConfig(segment_length=8, recall_dim=8, base_model_name_or_path="org/model")
    write_model_card(str(tmp_path), config, where="org/model-hmt", training="200 + 500 steps, two stages.",
                     results={"needle accuracy at 4k": "97%"})
    text = ModelCard.load(tmp_path / "README.md").text
    assert 'PeftModel.from_pretrained(base, "org/model-hmt")' in text and 'from_pretrained("org/model")' in text
    assert "200 + 500 steps, two stages." in text and "| needle accuracy at 4k | 97% |" in text


def test_saving_the_config_alone_writes_no_card(tmp_path) -> None:
    HMTConfig(segment_length=8).save_pretrained(tmp_path)
    assert not (tmp_path / "README.md").exists()


def test_card_of_a_locally_built_backbone_has_a_readable_title(tmp_path) -> None:
    model = peft.get_peft_model(tiny_causal_lm("llama"), HMTConfig(segment_length=8, recall_dim=8))
    model.save_pretrained(tmp_path / "llama")
    card = ModelCard.load(tmp_path / "llama" / "README.md").text.lstrip()
    assert card.splitlines()[0] == "# HMT adapter for a local LlamaForCausalLM (hidden 64, 2 layers)"
    assert 'AutoModelForCausalLM.from_pretrained("path/of/the/backbone")' in card
    gpt2 = peft.get_peft_model(tiny_causal_lm("gpt2", n_layer=3), HMTConfig(segment_length=8, recall_dim=8))
    gpt2.save_pretrained(tmp_path / "gpt2")
    assert ModelCard.load(tmp_path / "gpt2" / "README.md").text.lstrip().startswith("# HMT adapter for a local GPT2LMHeadModel (hidden 64, 3 layers)\n")
    # A card written again from the saved config alone (no backbone at hand) still says what it can.
    config = HMTConfig.from_pretrained(str(tmp_path / "llama"))
    (tmp_path / "again").mkdir()
    write_model_card(str(tmp_path / "again"), config)
    assert ModelCard.load(tmp_path / "again" / "README.md").text.lstrip().startswith(
        "# HMT adapter for a locally built backbone (embedding width 64)\n")
