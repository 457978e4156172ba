"""What README.md shows a user must be true: its API block runs as written, its figures are computed here."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import peft
import torch

from hmt_adapter import HMTConfig
from hmt_adapter.testing import tiny_causal_lm, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
HUB_ID = "HuggingFaceTB/SmolLM-135M"


def readme_api_block() -> str:
    """The Python block under the README's "The API in ..." heading."""
    start = README.index("## The API in")
    match = re.compile(r"```python\n(.*?)```", re.S).search(README, start)
    assert match is not None and match.start() < README.index("\n## ", start + 1), "no python block in the API section"
    return match.group(1)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_readme_api_block_runs_as_written_on_a_tiny_local_backbone(tmp_path, monkeypatch) -> None:
    code = readme_api_block()
    assert HUB_ID in code
    # A stand-in for SmolLM-135M: a tiny Llama with SmolLM's 2048 positions (so the README's segment_length=1024 fits)
    # and a tokenizer whose saved limit is that window, as a real backbone's tokenizer carries.
    local = tmp_path / "backbone"
    tiny_causal_lm("llama", max_position_embeddings=2048).save_pretrained(local)
    tiny_tokenizer(model_max_length=2048).save_pretrained(local)
    monkeypatch.chdir(tmp_path)  # the block saves "smollm-hmt" in the working directory
    handler = Records()
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # transformers' default verbosity, whatever the environment set
    namespace: dict = {}
    try:
        exec(compile(code.replace(HUB_ID, str(local)), "README.md", "exec"), namespace)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    batch, new_ids = namespace["batch"], namespace["new_ids"]
    assert batch.input_ids.shape[1] > 2 * 1024  # a text longer than the backbone's window, read in segments
    assert torch.isfinite(namespace["out"].loss)
    assert isinstance(namespace["model"], peft.PeftModel) and (tmp_path / "smollm-hmt" / "adapter_model.safetensors").is_file()
    assert new_ids.shape[0] == 1 and new_ids.shape[1] > batch.input_ids.shape[1]
    assert not [m for m in handler.messages if "Token indices sequence length" in m], handler.messages
