"""HMTConfig: defaults, derived sizes, validation, and what is written to / read from adapter_config.json."""

from __future__ import annotations

import json

import peft
import pytest

import hmt_adapter  # noqa: F401  (registers "HMT")
from hmt_adapter import HMTConfig
from hmt_adapter import testing as T


def test_public_fields_and_defaults() -> None:
    config = HMTConfig(
        task_type="CAUSAL_LM", segment_length=256, num_sensory=32, recall_window=300, recall_dim=4096,
        summary_fraction=0.5, memory_projection=True, recall_query="segment", bptt_depth=None, use_recall=True,
    )
    assert config.peft_type == peft.PeftType.HMT
    assert config.positions_per_segment == 256 + 32 + 2
    assert config.summary_length == 128
    assert HMTConfig().loss_scope == "all" and HMTConfig().lora_r == 0


@pytest.mark.parametrize(
    ("segment_length", "fraction", "expected"), [(8, 0.5, 4), (7, 0.5, 4), (10, 0.3, 3), (1, 0.01, 1), (5, 1.0, 5)]
)
def test_summary_length_rounds_up(segment_length: int, fraction: float, expected: int) -> None:
    assert HMTConfig(segment_length=segment_length, summary_fraction=fraction).summary_length == expected


def test_base_embedding_dim_saved_and_reloaded(tmp_path) -> None:
    model = peft.get_peft_model(T.tiny_causal_lm("opt-proj"), HMTConfig(task_type="CAUSAL_LM", segment_length=8,
                                                                         num_sensory=2, recall_dim=16))
    assert model.peft_config["default"].base_embedding_dim == 32  # embedding width, not hidden_size (64)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["base_embedding_dim"] == 32 and saved["peft_type"] == "HMT"
    loaded = HMTConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, HMTConfig) and loaded.base_embedding_dim == 32
    assert peft.PeftConfig.from_pretrained(str(tmp_path)).base_embedding_dim == 32
    for name in ("segment_length", "num_sensory", "recall_dim", "summary_fraction", "recall_query", "bptt_depth"):
        assert getattr(loaded, name) == getattr(model.peft_config["default"], name)


def test_bptt_and_lora_fields_round_trip_through_dict() -> None:
    config = HMTConfig(task_type="CAUSAL_LM", bptt_depth=3, lora_r=4, lora_target_modules=["q_proj", "v_proj"])
    again = HMTConfig(**{k: v for k, v in config.to_dict().items() if k not in ("peft_type",)})
    assert again.bptt_depth == 3 and again.lora_r == 4 and again.lora_target_modules == ["q_proj", "v_proj"]
