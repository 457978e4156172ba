"""The recipe's argument dataclasses, importable without torch, transformers, TRL or PEFT.

``hmt-adapter train --help`` and mistakes in flag values are answered from these alone, in well under a second;
the frameworks are imported only when work starts (`hmt_adapter_cli.recipes`).

`HMTArguments` are `HMTConfig`'s own fields (names, types, defaults, help). Importing `hmt_adapter.tuner.config` would
import PEFT and torch, so they are read from the source of ``hmt_adapter/tuner/config.py`` (its ``HMTConfig`` class body)
instead: one field list, in the library; `tests/test_recipes.py` checks that the two agree.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence, Union


@dataclass
class ModelArguments:
    """The backbone (frozen; optionally 4-bit) and its tokenizer."""

    model_name_or_path: str = field(
        default="", metadata={"help": "Hub id, local directory, or 'hmt-testing:<type>' for the tiny offline model."}
    )
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Defaults to the model's."})
    model_dtype: str = field(
        default="float32", metadata={"help": "Backbone weights dtype: float32, bfloat16, float16 or auto."}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the backbone in 4 bits (bitsandbytes nf4)."})
    bnb_4bit_compute_dtype: str = field(default="bfloat16", metadata={"help": "Compute dtype of the 4-bit layers."})
    attn_implementation: Optional[str] = field(default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2."})


@dataclass
class DataArguments:
    """Where the long documents come from and how they are cut for each stage."""

    dataset_name: Optional[str] = field(default=None, metadata={"help": "Hub dataset id, e.g. Salesforce/wikitext."})
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Hub dataset config, e.g. wikitext-103-raw-v1."})
    data_files: Optional[str] = field(
        default=None, metadata={"help": "Local file(s), comma-separated: .json/.jsonl/.txt/.parquet/.csv (wins over dataset_name)."}
    )
    data_format: Literal["auto", "text", "prompt_completion"] = field(
        default="auto",
        metadata={
            "help": "'prompt_completion': rows with a 'prompt' and a non-empty 'completion' (TRL's prompt-completion "
            "format, e.g. a long document + question, and its answer), trained with the loss on the completion only, "
            "each row whole (never chunked or truncated), in ONE stage with recall (stage 1 is skipped). 'text': "
            "documents in text_field, cut into chunks for the paper's two stages. 'auto': prompt_completion when the "
            "data have 'prompt' and 'completion' columns, text otherwise."
        },
    )
    completion_eos: bool = field(
        default=True,
        metadata={
            "help": "Prompt/completion data: score the EOS token TRL appends to every completion (true: the model "
            "learns to stop after its answer). false: rows end with the completion's own tokens, for a backbone "
            "that never learned to end an answer with EOS (recipes/retrieval-tiny.yaml: there, learning the EOS "
            "drowned the retrieval signal and nothing was retrieved beyond the window)."
        },
    )
    text_field: str = field(default="text", metadata={"help": "Column holding the document text."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    concatenate_documents: bool = field(
        default=False,
        metadata={
            "help": "Join all rows into one token stream before chunking (for line-per-row corpora such as "
            "Wikitext-103). False keeps documents apart (PG-19 books): memory never crosses a document."
        },
    )
    max_train_documents: Optional[int] = field(default=None, metadata={"help": "Use only the first N rows."})


@dataclass
class StageArguments:
    """The stages: the paper's two on text, one with recall on prompt/completion rows (with its curriculum)."""

    stage1_max_steps: int = field(
        default=200, metadata={"help": "Stage 1 (no recall) optimizer steps; 0 skips it. Text data only: "
                               "prompt/completion data skip stage 1."}
    )
    stage1_segments: int = field(default=2, metadata={"help": "Segments per training row in stage 1 (text data)."})
    stage2_max_steps: int = field(
        default=500, metadata={"help": "Stage 2 (recall on) optimizer steps; with prompt/completion data, the steps "
                               "of its one stage."}
    )
    stage2_segments: int = field(
        default=8, metadata={"help": "Segments per training row in stage 2 (text data; the maximum)."}
    )
    stage1_adapter: Optional[str] = field(
        default=None, metadata={"help": "Skip stage 1 and start stage 2 (the recall stage) from this saved stage-1 "
                                "adapter."}
    )
    lr_decay_steps: int = field(
        default=100, metadata={"help": "Multiply the LR by lr_decay_factor every N steps (text data; prompt/completion "
                               "data follow SFTConfig's lr_scheduler_type and warmup_steps, e.g. cosine)."}
    )
    lr_decay_factor: float = field(default=0.9, metadata={"help": "The step decay factor (paper: 0.9; text data)."})
    curriculum: bool = field(
        default=False,
        metadata={
            "help": "Prompt/completion data: a curriculum over input lengths (short inputs first). The rows the run "
            "reads (stage2_max_steps x the global batch; repeated or sampled from the data) are ordered with "
            "hmt_adapter.integrations.trl.curriculum_order on their token counts, so the longest input allowed grows from "
            "curriculum_min_segments segments to the longest over the first curriculum_ramp_fraction of training, "
            "and read in that order (train_sampling_strategy='sequential')."
        },
    )
    curriculum_min_segments: int = field(
        default=2, metadata={"help": "The curriculum's longest input at the start, in segments (>= 1)."}
    )
    curriculum_ramp_fraction: float = field(
        default=0.5, metadata={"help": "Share of training after which the curriculum allows every length, in (0, 1]."}
    )


# ---- HMTConfig's fields, read from its source --------------------------------------------------------------
#: HMTConfig fields that are not recipe settings: the runner sets use_recall per stage and tokenizer_name_or_path to
#: the recipe's tokenizer; the others are filled in when the adapter is attached.
NOT_RECIPE_FIELDS = ("use_recall", "base_embedding_dim", "target_modules", "tokenizer_name_or_path")
_ANNOTATION_NAMES = {
    "Optional": Optional, "Union": Union, "Literal": Literal, "Any": Any,
    "list": list, "dict": dict, "tuple": tuple, "str": str, "int": int, "float": float, "bool": bool,
}
_FACTORIES = {"list": list, "dict": dict}


def _config_source() -> str:
    """The path of ``hmt_adapter/tuner/config.py``, found without importing the ``hmt_adapter`` package."""
    spec = importlib.util.find_spec("hmt_adapter")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("hmt_adapter is not installed: pip install hmt-adapter")
    return os.path.join(list(spec.submodule_search_locations)[0], "tuner", "config.py")


def _field_spec(node: ast.AnnAssign) -> tuple[str, Any, Any]:
    """(name, type, dataclasses.field) of one ``name: type = field(default=..., metadata={...})`` statement."""
    name = node.target.id  # type: ignore[attr-defined]
    kind = eval(compile(ast.Expression(node.annotation), "<HMTConfig annotation>", "eval"), {"__builtins__": {}},
                dict(_ANNOTATION_NAMES))
    value = node.value
    if not (isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field"):
        return name, kind, field(default=ast.literal_eval(value))
    keywords = {k.arg: k.value for k in value.keywords}
    metadata = ast.literal_eval(keywords["metadata"]) if "metadata" in keywords else {}
    if "default" in keywords:
        return name, kind, field(default=ast.literal_eval(keywords["default"]), metadata=metadata)
    factory = getattr(keywords.get("default_factory"), "id", None)
    if factory not in _FACTORIES:
        raise TypeError(f"HMTConfig.{name}: hmt_adapter_cli.arguments reads literal defaults and list/dict "
                        "factories only.")
    return name, kind, field(default_factory=_FACTORIES[factory], metadata=metadata)


def hmt_config_fields(path: Optional[str] = None) -> list[tuple[str, Any, Any]]:
    """(name, type, field) of every field the ``HMTConfig`` class body declares (not PeftConfig's), in order."""
    with open(path or _config_source(), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "HMTConfig")
    return [_field_spec(n) for n in cls.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and not _is_class_var(n.annotation)]


def _is_class_var(annotation: ast.expr) -> bool:
    """``ClassVar`` / ``ClassVar[...]``: a class attribute, not a dataclass field."""
    node = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    return getattr(node, "id", None) == "ClassVar" or getattr(node, "attr", None) == "ClassVar"


def _hmt_argument_fields() -> list[tuple[str, Any, Any]]:
    out = []
    for name, kind, spec in hmt_config_fields():
        if name in NOT_RECIPE_FIELDS:
            continue
        if name == "lora_target_modules":  # str or list in the API; on the command line: 'all-linear' or 'a,b'
            kind = str
        out.append((name, kind, spec))
    return out


HMTArguments = dataclasses.make_dataclass("HMTArguments", _hmt_argument_fields())
HMTArguments.__doc__ = "The HMT adapter: HMTConfig's own fields, defaults and help (use_recall is set per stage)."

RECIPE_DATACLASSES = (ModelArguments, DataArguments, HMTArguments, StageArguments)

#: Recipe fields that always name a local path.
PATH_FIELDS = ("data_files", "stage1_adapter", "output_dir")
#: Fields that name a local path or something else (a Hub id, inline JSON): a relative path written in a recipe is
#: taken from the recipe's folder when it exists there.
PATH_OR_ID_FIELDS = ("model_name_or_path", "tokenizer_name_or_path", "dataset_name", "deepspeed", "fsdp_config",
                     "chat_template_path")
PATH_RULE = (
    "Relative paths written in a recipe resolve against the recipe file's folder (data_files, output_dir, "
    "stage1_adapter; model_name_or_path, tokenizer_name_or_path, dataset_name, deepspeed, fsdp_config and "
    "chat_template_path when that path exists there, otherwise they are Hub ids); paths given as --flags resolve "
    "against the working directory. Without output_dir, the adapter is written to outputs/<recipe name>/ in the "
    "working directory."
)


# ---- checking flag values before the frameworks are imported -----------------------------------------------
_TRUE, _FALSE = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")  # HfArgumentParser's string_to_bool


def _recipe_field_types() -> dict[str, Any]:
    return {name: kind for dc in RECIPE_DATACLASSES for name, kind in typing.get_type_hints(dc).items()}


def _check_value(name: str, kind: Any, value: Optional[str]) -> Optional[str]:
    """Why ``value`` is not a valid ``--name`` (as TRL's parser would say), or None."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) is Union and len(args) == 1:
        kind, args = args[0], list(typing.get_args(args[0]))
    if kind is bool:
        if value is None or value.lower() in _TRUE + _FALSE:
            return None
        return f"argument --{name}: invalid bool value: {value!r} (true or false)"
    if value is None:
        return f"argument --{name}: expected one argument"
    if typing.get_origin(kind) is Literal:
        choices = ", ".join(map(repr, args))
        return None if value in args else f"argument --{name}: invalid choice: {value!r} (choose from {choices})"
    if kind in (int, float):
        try:
            kind(value)
        except ValueError:
            return f"argument --{name}: invalid {kind.__name__} value: {value!r}"
    return None


def check_flag_values(argv: Sequence[str]) -> None:
    """`ValueError` for a recipe or HMT flag whose value does not parse (``--segment_length abc``).

    Flags of TRL's `SFTConfig`, and everything else, are left to TRL's parser, which runs once the frameworks are
    imported. Both spellings are accepted, as by TRL: ``--segment_length`` and ``--segment-length``.
    """
    types = _recipe_field_types()
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--"):
            continue
        name, eq, given = token[2:].partition("=")
        name = name.replace("-", "_")
        if name not in types:
            continue
        value: Optional[str] = given
        if not eq:
            value = argv[i] if i < len(argv) and not argv[i].startswith("--") else None
            i += value is not None
        problem = _check_value(name, types[name], value)
        if problem:
            raise ValueError(f"{problem} (see `hmt-adapter train --help`)")


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line that says where the help is (not a page of usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def normalize_flags(argv: Sequence[str]) -> list[str]:
    """``--data_files`` -> ``--data-files``: the hyphenated parsers of ``eval`` and ``demo`` take both spellings,
    as HF's and TRL's parsers do. Only flag names change (not values, nor anything after ``--``)."""
    out: list[str] = []
    rest = False
    for token in argv:
        if token == "--":
            rest = True
        if not rest and token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            token = "--" + name.replace("_", "-") + eq + value
        out.append(token)
    return out
