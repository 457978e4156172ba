"""The model card (README.md) a saved HMT adapter carries.

PEFT writes a blank template card (``base_model: ''`` when the backbone was built locally) that tells a reader
nothing about HMT and does not say that loading needs ``pip install hmt-adapter`` (which registers HMT with PEFT
whenever ``peft`` is imported; ``import hmt_adapter`` does the same explicitly).
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
BASE_PLACEHOLDER = "path/of/the/backbone"
#: Attribute of an `HMTConfig` (not a config field, not saved) holding the description of the backbone it is attached to.
BACKBONE_ATTR = "_hmt_backbone_description"


def backbone_description(model: Any) -> str:
    """What a backbone is, for a reader: its class, width and depth, e.g. ``LlamaForCausalLM (hidden 64, 2 layers)``."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = []
    hidden = getattr(text, "hidden_size", None)
    if hidden is None and hasattr(model, "get_input_embeddings"):
        hidden = model.get_input_embeddings().weight.shape[1]
    if hidden is not None:
        sizes.append(f"hidden {hidden}")
    layers = getattr(text, "num_hidden_layers", None)
    if layers is not None:
        sizes.append(f"{layers} layer" + ("s" if layers != 1 else ""))
    return type(model).__name__ + (f" ({', '.join(sizes)})" if sizes else "")


def describe_backbone_for_card(config: Any, model: Any) -> None:
    """Remember ``model``'s description on ``config`` for the card's title (a backbone built locally has no name)."""
    setattr(config, BACKBONE_ATTR, backbone_description(model))


def card_title(config: Any) -> str:
    """``HMT adapter for <base model>``; for a backbone built locally, what it is (class, width, depth)."""
    if config.base_model_name_or_path:
        return f"HMT adapter for {config.base_model_name_or_path}"
    described = getattr(config, BACKBONE_ATTR, None)
    if described:
        return f"HMT adapter for a local {described}"
    width = getattr(config, "base_embedding_dim", None)
    return "HMT adapter for a locally built backbone" + (f" (embedding width {width})" if width else "")


def _usage(base: str, where: str) -> str:
    return f"""```python
# pip install hmt-adapter: it registers the "HMT" adapter type with PEFT whenever peft is imported
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{where}")
tokenizer = AutoTokenizer.from_pretrained("{base}")
ids = tokenizer(long_text, return_tensors="pt").input_ids         # any length: HMT reads it segment by segment
out = model.generate(input_ids=ids, max_new_tokens=64)
```"""


def _package_version() -> str:
    """The installed hmt-adapter's version (from its metadata: the package's face sits a layer above the tuner)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hmt-adapter")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def card_text(config: Any, where: str, training: Optional[str] = None,
              results: Optional[Mapping[str, object]] = None) -> str:
    """The Markdown body of the card for ``config`` (``where``: the directory or Hub id to load from)."""
    base = config.base_model_name_or_path or BASE_PLACEHOLDER
    lora = f" and LoRA (r={config.lora_r}, alpha={config.lora_alpha}) on the backbone" if config.lora_r > 0 else ""
    rows = "\n".join(f"| `{name}` | `{getattr(config, name)!r}` |" for name in SETTINGS)
    parts = [
        f"# {card_title(config)}",
        "",
        f"A [Hierarchical Memory Transformer](https://arxiv.org/abs/2405.06067) (HMT) adapter made with hmt-adapter "
        f"{_package_version()}: the backbone reads inputs of any length segment by segment ({config.segment_length} tokens "
        f"each), with sensory memory, one memory embedding per segment and recall over the last "
        f"{config.recall_window} memories. The backbone's weights are frozen; the adapter holds HMT's parameters{lora}.",
        "",
        "## How to use",
        "",
        *([] if config.base_model_name_or_path else [
            "The backbone was built locally and its path was not recorded: load it from where it was saved.", ""]),
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
