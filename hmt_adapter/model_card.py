"""The model card (README.md) a saved HMT adapter carries.

PEFT writes a blank template card (``base_model: ''`` when the backbone was built locally) that tells a reader
nothing about HMT and omits the one line they need before `PeftModel.from_pretrained`: ``import hmt_adapter``.
`HMTConfig.save_pretrained` calls `write_model_card` right after PEFT's card is written, so every
``save_pretrained`` / ``push_to_hub`` of an HMT adapter carries this card; PEFT's metadata (tags, library, versions)
is kept. `write_model_card` can also be called again with ``training`` and ``results`` notes.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

CARD_NAME = "README.md"
SETTINGS = (
    "segment_length", "num_sensory", "recall_window", "recall_dim", "summary_fraction", "recall_query",
    "memory_projection", "write_token", "use_recall", "bptt_depth", "loss_scope", "lora_r", "lora_alpha", "lora_target_modules",
)
TAGS = ("hmt", "hmt-adapter", "long-context", "memory")
WHERE_PLACEHOLDER = "path/or/hub-id/of/this/adapter"


def _usage(base: str, where: str) -> str:
    return f"""```python
import hmt_adapter  # registers the "HMT" adapter type with PEFT: needed before loading
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{where}")
tokenizer = AutoTokenizer.from_pretrained("{base}")
ids = tokenizer(long_text, return_tensors="pt").input_ids         # any length: HMT reads it segment by segment
out = model.generate(input_ids=ids, max_new_tokens=64)
```"""


def card_text(config: Any, where: str, training: Optional[str] = None,
              results: Optional[Mapping[str, object]] = None) -> str:
    """The Markdown body of the card for ``config`` (``where``: the directory or Hub id to load from)."""
    from . import __version__

    base = config.base_model_name_or_path or "<base model: not recorded, the backbone was built locally>"
    lora = f" and LoRA (r={config.lora_r}, alpha={config.lora_alpha}) on the backbone" if config.lora_r > 0 else ""
    rows = "\n".join(f"| `{name}` | `{getattr(config, name)!r}` |" for name in SETTINGS)
    parts = [
        f"# HMT adapter for {base}",
        "",
        f"A [Hierarchical Memory Transformer](https://arxiv.org/abs/2405.06067) (HMT) adapter made with hmt-adapter "
        f"{__version__}: the backbone reads inputs of any length segment by segment ({config.segment_length} tokens "
        f"each), with sensory memory, one memory embedding per segment and recall over the last "
        f"{config.recall_window} memories. The backbone's weights are frozen; the adapter holds HMT's parameters{lora}.",
        "",
        "## How to use",
        "",
        _usage(base, where),
        "",
        "## HMT settings",
        "",
        "| setting | value |",
        "|---|---|",
        rows,
        "",
        f"`recall_query={config.recall_query!r}`: "
        + ("strictly causal (forward, streaming and generation agree exactly)." if config.recall_query == "previous"
           else "the paper's query, read from the segment's own first tokens (a lookahead under teacher forcing)."),
        "",
        "## Training",
        "",
        training or "Not recorded in this card.",
        "",
        "## Results",
        "",
    ]
    if results:
        parts += ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in results.items()]
    else:
        parts.append("Not recorded in this card.")
    return "\n".join(parts) + "\n"


def write_model_card(directory: str, config: Any, where: Optional[str] = None, training: Optional[str] = None,
                     results: Optional[Mapping[str, object]] = None) -> str:
    """Write ``directory/README.md`` for an HMT adapter, keeping the YAML metadata of a card already there.

    Returns the card's path.
    """
    from huggingface_hub import ModelCard, ModelCardData

    path = os.path.join(directory, CARD_NAME)
    data = ModelCard.load(path).data if os.path.isfile(path) else ModelCardData()
    data.library_name = "peft"
    data.pipeline_tag = data.pipeline_tag or "text-generation"
    if config.base_model_name_or_path:
        data.base_model = config.base_model_name_or_path
    elif not data.base_model:  # a backbone built locally: PEFT writes base_model: '' and an empty base_model tag
        data.base_model = None
    tags = {t for t in (data.tags or []) if t != "base_model:adapter:"}
    data.tags = sorted(tags | set(TAGS))
    body = card_text(config, where or WHERE_PLACEHOLDER, training, results)
    ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}").save(path)
    return path
