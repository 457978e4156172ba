"""The recipe runner behind ``hmt-adapter train RECIPE.yaml``: the paper's two-stage HMT training with TRL.

A recipe is a flat YAML file whose keys are the fields of the dataclasses below and of TRL's `SFTConfig`
(the same keys as command-line flags; flags given after the YAML path override it)::

    hmt-adapter train recipes/tiny-offline.yaml
    hmt-adapter train recipes/opt-350m-wikitext103.yaml --stage2_max_steps 100
    python -m hmt_adapter_cli.recipes --config recipes/tiny-offline.yaml     # TRL's own `--config` form
    accelerate launch --num_processes 8 -m hmt_adapter_cli.cli train recipes/smollm-135m.yaml   # 8 GPUs, DDP
    torchrun --nproc_per_node 2 -m hmt_adapter_cli.cli train recipes/tiny-offline.yaml       # 2 CPU processes (gloo)

(On a machine without GPUs, ``accelerate launch --cpu --num_processes 2`` runs ONE process unless an MPI
hostfile is given; use torchrun there.)

Stage 1 trains HMT without recall (``use_recall=False``) on chunks of ``stage1_segments`` segments; stage 2
attaches HMT with recall, loads the stage-1 weights (`hmt_adapter.training.load_stage1_weights`) and trains on
chunks of ``stage2_segments`` segments. The learning rate decays by ``lr_decay_factor`` every
``lr_decay_steps`` optimizer steps (the paper: x0.9 every 100 steps). The final adapter is saved to
``output_dir`` (stage 1's to ``output_dir/stage1``).

The HMT fields of a recipe are `HMTConfig`'s own fields, with its defaults and help texts (`HMTArguments` is
derived from it), and are validated by `HMTConfig`, so a bad value reads exactly as in the Python API.
Parsing is TRL's `TrlParser`: YAML values become defaults, ``--field value`` flags override them.

``model_name_or_path`` is a Hub id or a local directory; ``hmt-testing:<model_type>`` builds the tiny offline
model and tokenizer of `hmt_adapter.testing`. Data come from ``dataset_name`` (Hub) or ``data_files`` (local
json / jsonl / txt / parquet / csv; relative paths are resolved against the recipe's directory first).

Everything that prints lives in `hmt_adapter_cli.cli`; the Trainer's own logging follows ``report_to`` /
``logging_steps`` / ``disable_tqdm`` as usual.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from peft import PeftConfig

from hmt_adapter.config import HMTConfig

TESTING_SCHEME = "hmt-testing:"
_DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


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


#: HMTConfig fields that are not recipe settings: the runner sets use_recall per stage; the others are
#: filled in when the adapter is attached.
_NOT_RECIPE_FIELDS = ("use_recall", "base_embedding_dim", "target_modules")


def _hmt_argument_fields() -> list[tuple[str, Any, Any]]:
    """(name, type, field) for every recipe-settable field HMTConfig declares itself (not PeftConfig's)."""
    peft_fields = {f.name for f in dataclasses.fields(PeftConfig)}
    hints = typing.get_type_hints(HMTConfig)
    out = []
    for f in dataclasses.fields(HMTConfig):
        if f.name in peft_fields or f.name in _NOT_RECIPE_FIELDS:
            continue
        kind = hints[f.name]
        if f.name == "lora_target_modules":  # str or list in the API; on the command line: 'all-linear' or 'a,b'
            kind = str
        out.append((f.name, kind, field(default=f.default, metadata=dict(f.metadata))))
    return out


HMTArguments = dataclasses.make_dataclass("HMTArguments", _hmt_argument_fields())
HMTArguments.__doc__ = "The HMT adapter: HMTConfig's own fields, defaults and help (use_recall is set per stage)."


def hmt_config(args: Any, use_recall: bool) -> HMTConfig:
    """The `HMTConfig` of a recipe's HMT arguments for one stage (raises HMTConfig's own errors)."""
    kwargs = dataclasses.asdict(args)
    targets = kwargs.get("lora_target_modules")
    if isinstance(targets, str) and "," in targets:
        kwargs["lora_target_modules"] = [t.strip() for t in targets.split(",") if t.strip()]
    return HMTConfig(task_type="CAUSAL_LM", use_recall=use_recall, **kwargs)


@dataclass
class StageArguments:
    """The paper's two stages and its learning-rate schedule."""

    stage1_max_steps: int = field(default=200, metadata={"help": "Stage 1 (no recall) optimizer steps; 0 skips it."})
    stage1_segments: int = field(default=2, metadata={"help": "Segments per training row in stage 1."})
    stage2_max_steps: int = field(default=500, metadata={"help": "Stage 2 (recall on) optimizer steps."})
    stage2_segments: int = field(default=8, metadata={"help": "Segments per training row in stage 2 (the maximum)."})
    stage1_adapter: Optional[str] = field(
        default=None, metadata={"help": "Skip stage 1 and start stage 2 from this saved stage-1 adapter."}
    )
    lr_decay_steps: int = field(default=100, metadata={"help": "Multiply the LR by lr_decay_factor every N steps."})
    lr_decay_factor: float = field(default=0.9, metadata={"help": "The step decay factor (paper: 0.9)."})


RECIPE_DATACLASSES = (ModelArguments, DataArguments, HMTArguments, StageArguments)


# ---- parsing -------------------------------------------------------------------------------------------------
def make_parser():
    """TRL's `TrlParser` over the recipe dataclasses and TRL's `SFTConfig`; a bad flag or value raises
    `ValueError` (one line) instead of printing the whole usage."""
    from trl import SFTConfig, TrlParser

    class RecipeParser(TrlParser):
        def error(self, message: str):
            raise ValueError(f"{message} (see `hmt-adapter train --help`)")

    return RecipeParser((*RECIPE_DATACLASSES, SFTConfig), prog="hmt-adapter train")


def _resolve_data_files(data_args: DataArguments, recipe_dir: str) -> None:
    """``data_files`` entries that do not exist as given but exist next to the recipe are taken from there."""
    if not data_args.data_files:
        return
    resolved = []
    for part in (p.strip() for p in str(data_args.data_files).split(",")):
        candidate = os.path.join(recipe_dir, part)
        use_recipe_dir = not os.path.isabs(part) and not os.path.exists(part) and os.path.exists(candidate)
        resolved.append(candidate if use_recipe_dir else part)
    data_args.data_files = ",".join(resolved)


def _recipe_keys(parser: Any, path: str) -> list[str]:
    """The keys of the recipe YAML at ``path``; `ValueError` for a missing file, a non-mapping or unknown keys."""
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"Recipe file {path!r} not found.")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"Recipe {path!r} must be a mapping of argument names to values.")
    known = {f.name for dc in parser.dataclass_types for f in dataclasses.fields(dc)} | {"env"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Recipe {path!r} has unknown keys {unknown}; see `hmt-adapter train --help` for the valid ones.")
    return list(values)


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def parse_recipe(path: Optional[str], overrides: Sequence[str] = ()) -> tuple:
    """Read a recipe YAML (or None) and command-line ``overrides`` into the dataclasses + `SFTConfig`.

    Raises `ValueError` for a missing file, unknown keys, or HMT values `HMTConfig` refuses (its own message).
    On a machine without a GPU, ``use_cpu`` defaults to true (SFTConfig would refuse its bf16 default there).
    """
    parser = make_parser()
    args = list(overrides)
    given = {a[2:].split("=", 1)[0] for a in args if a.startswith("--")}
    if path is not None:
        given |= set(_recipe_keys(parser, path))
        args = ["--config", path, *args]
    if "use_cpu" not in given and not _has_accelerator():
        args += ["--use_cpu", "true"]  # SFTConfig refuses its default bf16 on a machine without a GPU otherwise
    parsed = parser.parse_args_and_config(args=args)
    model_args, data_args, hmt_args = parsed[0], parsed[1], parsed[2]
    if not model_args.model_name_or_path:
        raise ValueError("The recipe must set model_name_or_path (a Hub id, a local directory or hmt-testing:llama).")
    if path is not None:
        _resolve_data_files(data_args, os.path.dirname(os.path.abspath(path)))
    hmt_config(hmt_args, use_recall=True)  # HMTConfig validates every HMT value now, before anything is loaded
    return parsed


# ---- model and data ------------------------------------------------------------------------------------------
def load_model_and_tokenizer(args: ModelArguments):
    """The backbone (frozen by PEFT when the adapter is attached) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = args.model_name_or_path
    if name.startswith(TESTING_SCHEME):
        from hmt_adapter import testing

        return testing.tiny_causal_lm(name[len(TESTING_SCHEME) :]), testing.tiny_tokenizer()
    kwargs: dict[str, Any] = {}
    if args.model_dtype != "auto":
        kwargs["dtype"] = getattr(torch, args.model_dtype)
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=getattr(torch, args.bnb_4bit_compute_dtype)
        )
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path or name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_documents(args: DataArguments, split: Optional[str] = None) -> list[str]:
    """The text of every document (row) of the training data."""
    from datasets import load_dataset

    split = split or args.train_split
    if args.data_files:
        files = [f.strip() for f in args.data_files.split(",") if f.strip()]
        exts = {os.path.splitext(f)[1].lower() for f in files}
        if len(exts) != 1 or next(iter(exts)) not in _DATA_BUILDERS:
            raise ValueError(f"data_files must share one extension among {sorted(_DATA_BUILDERS)}, got {files}.")
        builder = _DATA_BUILDERS[exts.pop()]
        extra = {"sample_by": "document"} if builder == "text" else {}
        dataset = load_dataset(builder, data_files=files, split="train", **extra)
    elif args.dataset_name:
        dataset = load_dataset(args.dataset_name, args.dataset_config, split=split)
    else:
        raise ValueError("Set data_files (local) or dataset_name (Hub) in the recipe.")
    if args.text_field not in dataset.column_names:
        raise ValueError(f"The data have no column {args.text_field!r} (columns: {dataset.column_names}); set text_field.")
    if args.max_train_documents is not None:
        dataset = dataset.select(range(min(args.max_train_documents, len(dataset))))
    return [t for t in dataset[args.text_field] if t and t.strip()]


def tokenize_documents(texts: list[str], tokenizer: Any, concatenate: bool) -> list[list[int]]:
    """Token ids of each document, each followed by EOS (no truncation); one stream if ``concatenate``."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    docs = [ids + eos for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    if concatenate:
        return [[t for doc in docs for t in doc]]
    return docs


# ---- training ------------------------------------------------------------------------------------------------
def _step_decay_trainer_cls():
    from torch.optim.lr_scheduler import LambdaLR
    from trl import SFTTrainer

    class StepDecaySFTTrainer(SFTTrainer):
        """`SFTTrainer` with the paper's schedule: linear warmup, then x ``decay_factor`` every ``decay_steps``."""

        def __init__(self, *args: Any, decay_steps: int = 100, decay_factor: float = 0.9, **kwargs: Any) -> None:
            self.decay_steps, self.decay_factor = decay_steps, decay_factor
            super().__init__(*args, **kwargs)

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                warmup = self.args.get_warmup_steps(num_training_steps)
                every, factor = max(1, self.decay_steps), self.decay_factor

                def scale(step: int) -> float:
                    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
                    return ramp * factor ** (step // every)

                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, scale)
                self._created_lr_scheduler = True
            return self.lr_scheduler

    return StepDecaySFTTrainer


def _stage_dataset(docs: list[list[int]], segments: int, segment_length: int):
    from datasets import Dataset

    from hmt_adapter.training import chunk_token_ids

    chunks = chunk_token_ids(docs, segments * segment_length, min_tokens=2)
    if not chunks:
        raise ValueError("The training data produced no chunk with at least 2 tokens.")
    return Dataset.from_dict({"input_ids": chunks})


def train_stage(
    model: Any, config: Optional[HMTConfig], dataset: Any, tokenizer: Any, sft_args: Any, stage: StageArguments,
    max_steps: int, output_dir: str,
):
    """Train one stage; ``model`` is a base model (with ``config``) or a PeftModel (``config=None``)."""
    from hmt_adapter.training import check_max_length, check_sft_args

    args = copy.deepcopy(sft_args)
    args.max_steps, args.output_dir = max_steps, output_dir
    check_sft_args(args)
    check_max_length(dataset, args.max_length)
    trainer = _step_decay_trainer_cls()(
        model=model, peft_config=config, args=args, train_dataset=dataset, processing_class=tokenizer,
        decay_steps=stage.lr_decay_steps, decay_factor=stage.lr_decay_factor,
    )
    trainer.train()
    trainer.save_model(output_dir)
    return trainer


def run_recipe(model_args: ModelArguments, data_args: DataArguments, hmt_args: Any, stage: StageArguments, sft_args: Any) -> dict:
    """Run both stages; returns the output paths and each stage's logged losses."""
    import peft
    from peft import get_peft_model_state_dict

    from hmt_adapter.training import load_stage1_weights

    sft_args.max_length = None  # rows are chunked to the stage's length here, never truncated by TRL
    model, tokenizer = load_model_and_tokenizer(model_args)
    with sft_args.main_process_first(desc="tokenizing the documents"):
        docs = tokenize_documents(load_documents(data_args), tokenizer, data_args.concatenate_documents)
    report: dict[str, Any] = {"output_dir": sft_args.output_dir, "world_size": sft_args.world_size}
    stage1_weights: Any = stage.stage1_adapter
    if stage1_weights is None and stage.stage1_max_steps > 0:
        stage1_dir = os.path.join(sft_args.output_dir, "stage1")
        data = _stage_dataset(docs, stage.stage1_segments, hmt_args.segment_length)
        trainer = train_stage(model, hmt_config(hmt_args, use_recall=False), data, tokenizer, sft_args, stage, stage.stage1_max_steps, stage1_dir)
        report["stage1"] = {"dir": stage1_dir, "losses": _losses(trainer)}
        stage1_weights = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
        model = trainer.model.unload()  # the plain backbone again, for the stage-2 adapter
        del trainer
    peft_model = peft.get_peft_model(model, hmt_config(hmt_args, use_recall=True))
    if stage1_weights is not None:
        loaded = load_stage1_weights(peft_model, stage1_weights)
        report["stage2_init"] = {"loaded": len(loaded.loaded), "fresh_recall_params": loaded.missing_recall}
    data = _stage_dataset(docs, stage.stage2_segments, hmt_args.segment_length)
    trainer = train_stage(peft_model, None, data, tokenizer, sft_args, stage, stage.stage2_max_steps, sft_args.output_dir)
    report["stage2"] = {"dir": sft_args.output_dir, "losses": _losses(trainer)}
    if sft_args.process_index == 0:
        _record_training(trainer.model, sft_args.output_dir, model_args, data_args, stage, report)
    return report


def _record_training(model: Any, output_dir: str, model_args: ModelArguments, data_args: DataArguments,
                     stage: StageArguments, report: dict) -> None:
    """Add how the adapter was trained (and its last logged losses) to the saved adapter's model card."""
    from hmt_adapter.model_card import write_model_card

    config = model.peft_config["default"]
    data = data_args.dataset_name or os.path.basename(str(data_args.data_files))
    lines = [f"Trained with `hmt-adapter train` (TRL SFTTrainer) on {data}; backbone {model_args.model_name_or_path}"
             f"{' in 4 bits (nf4)' if model_args.load_in_4bit else ''}, frozen."]
    if "stage1" in report:
        lines.append(f"- stage 1 (no recall): {stage.stage1_max_steps} steps on {stage.stage1_segments}-segment rows")
    lines.append(f"- stage 2 (recall): {stage.stage2_max_steps} steps on {stage.stage2_segments}-segment rows"
                 f"{', initialised from stage 1' if 'stage2_init' in report else ''}")
    lines.append(f"- learning rate decays x{stage.lr_decay_factor} every {stage.lr_decay_steps} steps")
    results = {}
    for name in ("stage1", "stage2"):
        losses = report.get(name, {}).get("losses")
        if losses:
            results[f"{name} training loss (first -> last logged)"] = f"{losses[0]:.4f} -> {losses[-1]:.4f}"
    write_model_card(output_dir, config, training="\n".join(lines), results=results)


def _losses(trainer: Any) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """``hmt-adapter train RECIPE.yaml [--flag value ...]`` (also ``python -m hmt_adapter_cli.recipes --config
    RECIPE.yaml``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = argv.pop(0) if argv and not argv[0].startswith("-") else None
    return run_recipe(*parse_recipe(path, argv))


if __name__ == "__main__":
    main()
