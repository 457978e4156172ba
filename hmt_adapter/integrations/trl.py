"""Helpers for training an HMT adapter with TRL: input checks, document chunking and two-stage loading.

TRL's `SFTTrainer` trains an HMT adapter as it is (``SFTTrainer(model=base, peft_config=HMTConfig(...))`` or
``SFTTrainer(model=peft_model)``): it calls ``model(**batch, fused_lm_head=True)``, which the HMT forward
serves segment by segment. What TRL does not know is that an HMT model is meant to read *long* documents:

* ``SFTConfig.max_length`` (default 1024) silently cuts every longer document. `check_max_length` finds the
  documents that would be cut and raises (or warns), so the limit is a decision, not an accident. Set
  ``max_length=None`` to train on whole documents, or split them yourself (`chunk_token_ids`).
* ``padding_free=True`` (and ``packing=True`` with the default "bfd" strategy, which turns it on) flattens a
  batch into one row and passes ``position_ids``: HMT assigns positions per segment and carries memory along
  a row, so that layout is rejected (`check_sft_args`). Use ``padding_free=False`` and either no packing (one
  document per row: memory is carried through the whole document; recommended) or
  ``packing=True, packing_strategy="wrapped"`` (documents are concatenated and cut into rows: memory then
  flows across document borders inside a row, as in plain LM pretraining on concatenated text).

The paper trains in two stages: stage 1 without recall (``use_recall=False``) on 2 segments, stage 2 with
recall on the maximum number of segments, initialised from stage 1 (`load_stage1_weights`).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME

from ..tuner.config import HMTConfig

#: Parameters that exist only with ``use_recall=True``: absent from a stage-1 adapter, by design.
RECALL_PARAM_NAMES = ("hmt_summary_token", "hmt_recall_q", "hmt_recall_k")


# ---- documents and max_length ---------------------------------------------------------------------------
def document_lengths(dataset: Any, tokenizer: Any = None, text_field: str = "text") -> list[int]:
    """Token count of every document of ``dataset`` (rows with ``input_ids``, or text tokenized with ``tokenizer``).

    Text rows are counted as TRL's SFTTrainer tokenizes them: without special tokens, plus one EOS token.
    """
    columns = set(getattr(dataset, "column_names", None) or (dataset[0].keys() if len(dataset) else ()))
    if "input_ids" in columns:
        return [len(ids) for ids in dataset["input_ids"]]
    if text_field not in columns:
        raise ValueError(
            f"The dataset has neither an 'input_ids' column nor the text column {text_field!r} (columns: "
            f"{sorted(columns)}). Pass text_field=... naming the column that holds the documents."
        )
    if tokenizer is None:
        raise ValueError("The dataset holds text: pass the tokenizer (processing_class) to count its tokens.")
    texts = list(dataset[text_field])
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(ids) + 1 for ids in encoded]  # TRL appends the EOS token


def check_max_length(
    dataset: Any,
    max_length: Optional[int],
    tokenizer: Any = None,
    *,
    text_field: str = "text",
    on_overflow: str = "raise",
) -> int:
    """Find the documents that ``SFTConfig(max_length=max_length)`` would silently truncate.

    Args:
        dataset: a `datasets.Dataset` (or list of dicts) with ``input_ids`` or a text column.
        max_length: the trainer's ``max_length``; None means no truncation (nothing to check).
        tokenizer: needed when the dataset holds text.
        on_overflow: "raise" (`ValueError`), "warn" (`UserWarning`) or "ignore".

    Returns:
        The number of documents longer than ``max_length``.
    """
    if on_overflow not in ("raise", "warn", "ignore"):
        raise ValueError(f"on_overflow must be 'raise', 'warn' or 'ignore', got {on_overflow!r}.")
    if max_length is None:
        return 0
    lengths = document_lengths(dataset, tokenizer, text_field)
    over = [n for n in lengths if n > max_length]
    if over and on_overflow != "ignore":
        message = (
            f"{len(over)} of {len(lengths)} documents are longer than max_length={max_length} tokens (longest: "
            f"{max(over)}) and would be truncated, so HMT would never see their ends. Set max_length=None in "
            f"SFTConfig to train on whole documents (HMT reads any length segment by segment), raise max_length, "
            f"or split the documents first (hmt_adapter.integrations.trl.chunk_token_ids)."
        )
        if on_overflow == "raise":
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return len(over)


def check_sft_args(args: Any) -> None:
    """Reject TRL settings whose batch layout HMT cannot carry memory through (see the module docstring)."""
    packing = bool(getattr(args, "packing", False))
    strategy = getattr(args, "packing_strategy", None)
    if getattr(args, "padding_free", False) or (packing and strategy in ("bfd", "bfd_split")):
        raise ValueError(
            "HMT does not support padding-free batches (they flatten a batch into one row with position_ids, but "
            "HMT assigns positions per segment and carries memory along a row). Set padding_free=False in "
            "SFTConfig, and packing=False (recommended: one document per row) or packing=True with "
            "packing_strategy='wrapped'."
        )
    if packing:
        warnings.warn(
            "packing=True with packing_strategy='wrapped' concatenates documents into rows: HMT memory then flows "
            "across document borders inside a row. Use packing=False to carry memory within one document only.",
            UserWarning,
            stacklevel=2,
        )


def chunk_token_ids(
    documents: Iterable[Sequence[int]], chunk_tokens: int, min_tokens: int = 2
) -> list[list[int]]:
    """Split each document into consecutive pieces of ``chunk_tokens`` tokens (the last may be shorter).

    Pieces shorter than ``min_tokens`` are dropped (they hold no next-token target). Nothing is discarded
    otherwise, unlike truncation.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}.")
    chunks: list[list[int]] = []
    for doc in documents:
        doc = list(doc)
        for start in range(0, len(doc), chunk_tokens):
            piece = doc[start : start + chunk_tokens]
            if len(piece) >= min_tokens:
                chunks.append(piece)
    return chunks


def curriculum_order(
    lengths: Sequence[int], segment_length: int, min_segments: int = 2, ramp_fraction: float = 0.5, seed: int = 0
) -> list[int]:
    """An order of the rows for a curriculum over input lengths: short inputs first, all lengths by ``ramp_fraction``.

    Row ``i`` of the order is drawn at random among the rows not yet used whose segment count (``ceil(length /
    segment_length)``) is at most the limit at ``i``, which grows linearly from ``min_segments`` at the start to the
    longest row at ``ramp_fraction`` of the order (the shortest unused row when none fits). Train on it with
    ``SFTConfig(train_sampling_strategy="sequential")`` (one epoch) so the trainer reads the rows in this order.
    Memory that must carry a fact across many segments is learned first on inputs where it spans few.

    Args:
        lengths: token count of every row.
        segment_length: the adapter's ``segment_length``.
        min_segments: the longest input allowed at the start (in segments).
        ramp_fraction: share of the order after which every length is allowed, in (0, 1].
        seed: the random draw among allowed rows.

    Returns:
        a permutation of ``range(len(lengths))``.
    """
    import random

    if segment_length < 1 or min_segments < 1:
        raise ValueError(f"segment_length and min_segments must be >= 1, got {segment_length} and {min_segments}.")
    if not 0.0 < ramp_fraction <= 1.0:
        raise ValueError(f"ramp_fraction must be in (0, 1], got {ramp_fraction}.")
    segments = [max(1, -(-int(n) // segment_length)) for n in lengths]
    if not segments:
        return []
    longest, total = max(segments), len(segments)
    by_count: dict[int, list[int]] = {}
    rng = random.Random(seed)
    for i in rng.sample(range(total), total):  # shuffled within each segment count
        by_count.setdefault(segments[i], []).append(i)
    order: list[int] = []
    for step in range(total):
        limit = min_segments + (longest - min_segments) * min(1.0, step / (ramp_fraction * total))
        allowed = [c for c, rows in by_count.items() if rows and c <= limit]
        if not allowed:
            allowed = [min(c for c, rows in by_count.items() if rows)]
        # a count is drawn in proportion to its unused rows, so lengths mix as the data's distribution allows
        weights = [len(by_count[c]) for c in allowed]
        count = rng.choices(allowed, weights=weights)[0]
        order.append(by_count[count].pop())
    return order


# ---- two-stage training --------------------------------------------------------------------------------
@dataclass
class Stage1Load:
    """What `load_stage1_weights` did: keys loaded, and the recall parameters stage 1 did not have."""

    loaded: list[str]
    missing_recall: list[str]


def _read_adapter(source: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> tuple[dict, Optional[dict]]:
    if isinstance(source, Mapping):
        return dict(source), None
    path = os.fspath(source)
    config = None
    if os.path.isdir(path):
        config_path = os.path.join(path, "adapter_config.json")
        if os.path.isfile(config_path):
            with open(config_path) as f:
                config = json.load(f)
        path = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"No stage-1 adapter weights at {path!r}: pass the directory written by save_pretrained/save_model "
            f"of stage 1 (it holds {SAFETENSORS_WEIGHTS_NAME})."
        )
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu"), config
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ValueError(f"Could not read the stage-1 adapter weights {path!r} ({exc}).") from None


def _strip_adapter_name(key: str, adapter_name: str) -> str:
    return key.replace(f".{adapter_name}.", ".").removesuffix(f".{adapter_name}")


def load_stage1_weights(
    peft_model: Any,
    source: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    adapter_name: str = "default",
) -> Stage1Load:
    """Initialise a stage-2 HMT adapter (recall on) from a stage-1 adapter (``use_recall=False``).

    Every weight of the stage-1 adapter must exist in the stage-2 model with the same shape; the stage-2 model
    may additionally have the recall parameters (``hmt_summary_token``, ``hmt_recall_q``, ``hmt_recall_k``),
    which keep their fresh initialisation and are reported in the result. Any other mismatch (a LoRA rank or
    embedding width that differs, an unknown key) raises `ValueError` before anything is loaded.

    Args:
        peft_model: the stage-2 `PeftModel` with an HMT adapter.
        source: a directory written by ``save_pretrained``, the path of its ``adapter_model.safetensors``, or a
            state dict as returned by ``peft.get_peft_model_state_dict`` (keys without the adapter name).
        adapter_name: the stage-2 adapter to fill.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    saved, saved_config = _read_adapter(source)
    target_config = peft_model.peft_config.get(adapter_name)
    if not isinstance(target_config, HMTConfig):
        raise ValueError(f"Adapter {adapter_name!r} of the model is not an HMT adapter; attach HMTConfig(...) first.")
    if saved_config is not None:
        width = saved_config.get("base_embedding_dim")
        if width is not None and target_config.base_embedding_dim is not None and width != target_config.base_embedding_dim:
            raise ValueError(
                f"The stage-1 adapter was trained on a backbone with embedding width {width}, this model has "
                f"{target_config.base_embedding_dim}: load it onto the same backbone."
            )
    expected = {_strip_adapter_name(k, adapter_name): v for k, v in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()}
    unexpected = sorted(set(saved) - set(expected))
    missing = sorted(set(expected) - set(saved))
    missing_recall = [k for k in missing if any(name in k for name in RECALL_PARAM_NAMES)]
    missing_other = [k for k in missing if k not in missing_recall]
    shape_errors = [
        f"{k}: stage 1 {tuple(saved[k].shape)} vs stage 2 {tuple(expected[k].shape)}"
        for k in sorted(set(saved) & set(expected))
        if saved[k].shape != expected[k].shape
    ]
    problems = []
    if unexpected:
        problems.append(f"keys the stage-2 model does not have: {unexpected[:5]}")
    if missing_other:
        problems.append(f"stage-2 weights the stage-1 adapter lacks (other than recall): {missing_other[:5]}")
    if shape_errors:
        problems.append(f"shapes that differ: {shape_errors[:5]}")
    if problems:
        raise ValueError(
            "The stage-1 adapter does not fit the stage-2 model: " + "; ".join(problems) + ". Build stage 2 with the "
            "same backbone, memory_projection and LoRA settings (lora_r, lora_target_modules) as stage 1; only "
            "use_recall (and the recall settings) may change."
        )
    set_peft_model_state_dict(peft_model, saved, adapter_name=adapter_name)
    return Stage1Load(loaded=sorted(saved), missing_recall=missing_recall)
