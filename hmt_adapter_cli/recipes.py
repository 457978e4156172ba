"""The recipe runner behind ``hmt-adapter train RECIPE.yaml``: HMT training with TRL, in the paper's two stages on text
documents, or in one stage with recall on prompt/completion rows.

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
attaches HMT with recall, loads the stage-1 weights (`hmt_adapter.integrations.trl.load_stage1_weights`) and trains on
chunks of ``stage2_segments`` segments. The learning rate decays by ``lr_decay_factor`` every
``lr_decay_steps`` optimizer steps (the paper: x0.9 every 100 steps). The final adapter is saved to
``output_dir`` (stage 1's to ``output_dir/stage1``).

Prompt/completion data (rows with ``prompt`` and ``completion``, TRL's prompt-completion format; ``data_format``
picks it from the columns) train ONE stage with recall instead, with TRL's loss on the completion only, on whole
rows (never chunked nor truncated), for ``stage2_max_steps`` steps with SFTConfig's own learning-rate schedule
(``lr_scheduler_type``, ``warmup_steps``), optionally in a curriculum over input lengths (``curriculum``); stage 1
is skipped. The training itself is `hmt_adapter_cli.prompt_completion.train_prompt_completion`, which the
long-context benchmark runs too (``recipes/retrieval-tiny.yaml`` is the recipe it measured).

The HMT fields of a recipe are `HMTConfig`'s own fields, with its defaults and help texts (`HMTArguments` is
derived from it), and are validated by `HMTConfig`, so a bad value reads exactly as in the Python API.
Parsing is TRL's `TrlParser`: YAML values become defaults, ``--field value`` flags override them.

``model_name_or_path`` is a Hub id or a local directory; ``hmt-testing:<model_type>`` builds the tiny offline
model and tokenizer of `hmt_adapter.testing`. Data come from ``dataset_name`` (Hub) or ``data_files`` (local
json / jsonl / txt / parquet / csv). A Hub id that cannot be fetched (offline, or the Hub unreachable, and not in
the cache) stops the run at once with a one-line error (`hmt_adapter_cli.hub`).

Paths, one rule (`PATH_RULE`, also in ``hmt-adapter train --help``): a relative path written in the recipe is
relative to the recipe file's folder (``data_files: data/tiny_docs.jsonl`` next to ``tiny-offline.yaml``; the
same for ``output_dir`` and ``stage1_adapter``, and for ``model_name_or_path``, ``tokenizer_name_or_path``,
``dataset_name``, ``deepspeed``, ``fsdp_config`` and ``chat_template_path`` when that path exists there, since they
may also be Hub ids); a path given as a ``--flag`` is relative to the working directory, as in any command. Without
``output_dir`` (the recipes in recipes/ leave it out) the adapter goes to ``outputs/<recipe name>/`` in the
working directory.

Everything that prints lives in `hmt_adapter_cli.cli`; the Trainer's own logging follows ``report_to`` /
``logging_steps`` / ``disable_tqdm`` as usual.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from typing import Any, Optional, Sequence

from hmt_adapter.tuner.config import AUTO_INIT_TEXT, HMTConfig

from .arguments import (  # noqa: F401  (re-exported: the recipe dataclasses live in the light arguments module)
    PATH_OR_ID_FIELDS, PATH_FIELDS, PATH_RULE, RECIPE_DATACLASSES, DataArguments, HMTArguments, ModelArguments,
    StageArguments,
)
from .prompt_completion import (
    Curriculum, check_rows, logged_losses, prompt_end_text, resolve_data_format, train_prompt_completion,
)

TESTING_SCHEME = "hmt-testing:"
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model")
_DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


def hmt_config(args: Any, use_recall: bool, model_args: Optional[ModelArguments] = None,
               init_text: Optional[str] = None) -> HMTConfig:
    """The `HMTConfig` of a recipe's HMT arguments for one stage (raises HMTConfig's own errors); a write token that
    starts from text (``write_token_init_text``) is tokenized with the recipe's tokenizer (``model_args``).
    ``write_token_init_text: auto`` takes ``init_text`` (the prompts' ending, `prompt_end_text`); without it (when
    the recipe is checked before its data are read) a stand-in validates everything else."""
    kwargs = dataclasses.asdict(args)
    if kwargs.get("write_token_init_text") == AUTO_INIT_TEXT:
        kwargs["write_token_init_text"] = init_text or "?"
    if kwargs.get("write_token_init_text") is not None and model_args is not None:
        source = model_args.tokenizer_name_or_path or model_args.model_name_or_path
        if source and source.startswith(TESTING_SCHEME) and not model_args.tokenizer_name_or_path:
            raise ValueError(f"write_token_init_text needs a tokenizer on disk or on the Hub, and {source} has none: "
                             "set tokenizer_name_or_path, or leave write_token_init_text unset.")
        kwargs["tokenizer_name_or_path"] = source
    targets = kwargs.get("lora_target_modules")
    if isinstance(targets, str) and "," in targets:
        kwargs["lora_target_modules"] = [t.strip() for t in targets.split(",") if t.strip()]
    return HMTConfig(task_type="CAUSAL_LM", use_recall=use_recall, **kwargs)


# ---- parsing -------------------------------------------------------------------------------------------------
def make_parser():
    """TRL's `TrlParser` over the recipe dataclasses and TRL's `SFTConfig`; a bad flag or value raises
    `ValueError` (one line) instead of printing the whole usage."""
    from trl import SFTConfig, TrlParser

    class RecipeParser(TrlParser):
        def error(self, message: str):
            raise ValueError(f"{message} (see `hmt-adapter train --help`)")

    return RecipeParser((*RECIPE_DATACLASSES, SFTConfig), prog="hmt-adapter train")


def _recipe_dir_path(value: str, recipe_dir: str, always: bool) -> str:
    if os.path.isabs(os.path.expanduser(value)):
        return value
    candidate = os.path.normpath(os.path.join(recipe_dir, value))
    return candidate if always or os.path.exists(candidate) else value


def _path_overrides(recipe: str, values: dict, given: set) -> list[str]:
    """``--field value`` flags that apply `PATH_RULE` to the recipe's relative paths (not to flags in ``given``)."""
    recipe_dir = os.path.dirname(os.path.abspath(recipe))
    out = []
    for name in PATH_FIELDS + PATH_OR_ID_FIELDS:
        value = values.get(name)
        if name in given or not isinstance(value, str) or not value.strip():
            continue
        parts = [p.strip() for p in value.split(",")] if name == "data_files" else [value]
        resolved = ",".join(_recipe_dir_path(p, recipe_dir, always=name in PATH_FIELDS) for p in parts if p)
        if resolved != value:
            out += [f"--{name}", resolved]
    if "output_dir" not in given and "output_dir" not in values:
        out += ["--output_dir", os.path.join("outputs", os.path.splitext(os.path.basename(recipe))[0])]
    return out


def _read_recipe(parser: Any, path: str) -> dict:
    """The recipe YAML at ``path`` as a mapping; `ValueError` for a missing file, a non-mapping or unknown keys."""
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
    return values


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def parse_recipe(path: Optional[str], overrides: Sequence[str] = ()) -> tuple:
    """Read a recipe YAML (or None) and command-line ``overrides`` into the dataclasses + `SFTConfig`.

    Relative paths follow `PATH_RULE`. Raises `ValueError` for a missing recipe or data file, unknown keys, or HMT
    values `HMTConfig` refuses (its own message). On a machine without a GPU, ``use_cpu`` defaults to true
    (SFTConfig would refuse its bf16 default there).
    """
    parser = make_parser()
    args = list(overrides)
    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in args if a.startswith("--")}
    if path is not None:
        values = _read_recipe(parser, path)
        args = ["--config", path, *args, *_path_overrides(path, values, given)]
        given |= set(values)
    if "use_cpu" not in given and not _has_accelerator():
        args += ["--use_cpu", "true"]  # SFTConfig refuses its default bf16 on a machine without a GPU otherwise
    parsed = parser.parse_args_and_config(args=args)
    model_args, data_args, hmt_args, stage, sft_args = parsed
    if not model_args.model_name_or_path:
        raise ValueError("The recipe must set model_name_or_path (a Hub id, a local directory or hmt-testing:llama).")
    _check_data_files(data_args)
    hmt_config(hmt_args, use_recall=True, model_args=model_args)  # HMTConfig validates every HMT value now, before anything is loaded
    curriculum_of(stage)  # and the curriculum's
    if "max_length" not in given:  # rows are never truncated; a max_length the recipe sets is checked, not applied
        sft_args.max_length = None
    return parsed


def curriculum_of(stage: StageArguments) -> Optional[Curriculum]:
    """The recipe's `Curriculum`, or None without ``curriculum: true`` (`ValueError` for a bad value)."""
    curriculum = Curriculum(stage.curriculum_min_segments, stage.curriculum_ramp_fraction)
    return curriculum if stage.curriculum else None


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
    tokenizer_name = args.tokenizer_name_or_path or name
    if os.path.isdir(tokenizer_name) and not any(os.path.isfile(os.path.join(tokenizer_name, f)) for f in _TOKENIZER_FILES):
        raise ValueError(
            f"{tokenizer_name!r} holds no tokenizer ({', '.join(_TOKENIZER_FILES[:2])}, ...): set tokenizer_name_or_path "
            f"to the backbone's tokenizer (an hmt-demo-output/backbone written before the demo saved its tokenizer: "
            f"run `hmt-adapter demo` again)."
        )
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _data_file_list(data_files: Optional[str]) -> list[str]:
    return [f.strip() for f in str(data_files or "").split(",") if f.strip()]


def _is_blank(path: str) -> bool:
    """Whether the file holds nothing but whitespace (read until its first other byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _no_documents(what: str, text_field: str) -> ValueError:
    example = '{"%s": "..."}' % text_field
    return ValueError(
        f"{what}: add documents (.jsonl: one JSON object per line such as {example}; .txt: the document's text) "
        f"or use another file."
    )


def _check_data_files(args: DataArguments) -> None:
    """`ValueError` naming a ``data_files`` entry that is missing or empty, before anything is loaded."""
    for path in _data_file_list(args.data_files):
        if not os.path.isfile(path):
            raise ValueError(f"data file {path!r} not found (a relative path in a recipe is relative to the recipe's "
                             f"folder; one given as a --flag, to the working directory).")
        if _is_blank(path):
            raise _no_documents(f"data file {path!r} is empty", args.text_field)


def load_rows(args: DataArguments, split: Optional[str] = None) -> tuple[Any, str]:
    """(the training data as a `datasets.Dataset`, a phrase naming where they come from)."""
    from datasets import load_dataset

    split = split or args.train_split
    if args.data_files:
        _check_data_files(args)
        files = _data_file_list(args.data_files)
        exts = {os.path.splitext(f)[1].lower() for f in files}
        if len(exts) != 1 or next(iter(exts)) not in _DATA_BUILDERS:
            raise ValueError(f"data_files must share one extension among {sorted(_DATA_BUILDERS)}, got {files}.")
        builder = _DATA_BUILDERS[exts.pop()]
        extra = {"sample_by": "document"} if builder == "text" else {}
        dataset = load_dataset(builder, data_files=files, split="train", **extra)
        source = f"data file(s) {', '.join(map(repr, files))}"
    elif args.dataset_name:
        dataset = load_dataset(args.dataset_name, args.dataset_config, split=split)
        source = f"dataset {args.dataset_name!r} (split {split!r})"
    else:
        raise ValueError("Set data_files (local) or dataset_name (Hub) in the recipe.")
    if args.max_train_documents is not None:
        dataset = dataset.select(range(min(args.max_train_documents, len(dataset))))
    return dataset, source


def documents_of(dataset: Any, source: str, args: DataArguments) -> list[str]:
    """The non-empty texts of ``args.text_field``; `ValueError` when the column is missing or holds nothing."""
    if args.text_field not in dataset.column_names:
        raise ValueError(f"The data have no column {args.text_field!r} (columns: {dataset.column_names}); set text_field.")
    texts = [t for t in dataset[args.text_field] if t and t.strip()]
    if not texts:
        raise _no_documents(f"{source} has no documents (no row with a non-empty {args.text_field!r})", args.text_field)
    return texts


def load_documents(args: DataArguments, split: Optional[str] = None) -> list[str]:
    """The text of every document (row) of the training data; `ValueError` when there is none."""
    return documents_of(*load_rows(args, split), args)


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

    from hmt_adapter.integrations.trl import chunk_token_ids

    chunks = chunk_token_ids(docs, segments * segment_length, min_tokens=2)
    if not chunks:
        raise ValueError("The training data produced no chunk with at least 2 tokens.")
    return Dataset.from_dict({"input_ids": chunks})


def train_stage(
    model: Any, config: Optional[HMTConfig], dataset: Any, tokenizer: Any, sft_args: Any, stage: StageArguments,
    max_steps: int, output_dir: str,
):
    """Train one stage; ``model`` is a base model (with ``config``) or a PeftModel (``config=None``)."""
    from hmt_adapter.integrations.trl import check_max_length, check_sft_args

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


def check_hub_access(model_args: ModelArguments, data_args: DataArguments) -> None:
    """One-line `ValueError` when the backbone, tokenizer or dataset is on an unreachable Hub and not cached."""
    from .hub import HubSource, check_hub_sources

    sources = [HubSource("--model_name_or_path", model_args.model_name_or_path, "model",
                         "--model_name_or_path /path/to/model")]
    if model_args.tokenizer_name_or_path:
        sources.append(HubSource("--tokenizer_name_or_path", model_args.tokenizer_name_or_path, "model",
                                 "--tokenizer_name_or_path /path/to/tokenizer"))
    if data_args.dataset_name and not data_args.data_files:
        sources.append(HubSource("--dataset_name", data_args.dataset_name, "dataset", "--data_files /path/to/docs.jsonl"))
    check_hub_sources(sources)


def run_recipe(model_args: ModelArguments, data_args: DataArguments, hmt_args: Any, stage: StageArguments, sft_args: Any) -> dict:
    """Train the adapter: the paper's two stages on text documents, one stage with recall on prompt/completion rows
    (`data_format`); returns the output paths and each stage's logged losses."""
    check_hub_access(model_args, data_args)
    with sft_args.main_process_first(desc="loading the data"):
        rows, source = load_rows(data_args)
    if resolve_data_format(rows.column_names, data_args.data_format, source) == "prompt_completion":
        check_rows(rows, source)
        return run_prompt_completion(model_args, data_args, hmt_args, stage, sft_args,
                                     rows.select_columns(["prompt", "completion"]))
    if hmt_args.write_token_init_text == AUTO_INIT_TEXT:
        raise ValueError(f"write_token_init_text: auto starts the write token at the prompts' last token, and {source} "
                         "hold text documents (no prompts): set the text yourself, or leave it unset.")
    if stage.curriculum:
        raise ValueError(f"curriculum orders prompt/completion rows by length, and {source} hold text documents (cut "
                         f"into equal chunks per stage): set curriculum: false, or train on prompt/completion rows.")
    return run_two_stages(model_args, data_args, hmt_args, stage, sft_args, documents_of(rows, source, data_args))


def run_prompt_completion(model_args: ModelArguments, data_args: DataArguments, hmt_args: Any, stage: StageArguments,
                          sft_args: Any, rows: Any) -> dict:
    """One stage with recall on whole prompt/completion rows (no stage 1): `train_prompt_completion`."""
    import peft

    from hmt_adapter.integrations.trl import load_stage1_weights

    model, tokenizer = load_model_and_tokenizer(model_args)
    report: dict[str, Any] = {"output_dir": sft_args.output_dir, "world_size": sft_args.world_size}
    init_text = None
    if hmt_args.write_token_init_text == AUTO_INIT_TEXT:
        init_text, share = prompt_end_text(rows["prompt"], tokenizer)
        report["write_token_init_text"] = {"text": init_text, "share_of_prompts": share}
        if sft_args.process_index == 0:
            print(f"hmt-adapter train: write_token_init_text: auto -> {init_text!r} (its last token ends "
                  f"{100 * share:.0f}% of the prompts)", flush=True)
    config = hmt_config(hmt_args, use_recall=True, model_args=model_args, init_text=init_text)
    peft_model = peft.get_peft_model(model, config)
    if stage.stage1_adapter is not None:
        loaded = load_stage1_weights(peft_model, stage.stage1_adapter)
        report["stage2_init"] = {"loaded": len(loaded.loaded), "fresh_recall_params": loaded.missing_recall}
    args = copy.deepcopy(sft_args)
    args.max_steps = stage.stage2_max_steps
    trainer = train_prompt_completion(peft_model, rows, tokenizer, args, curriculum=curriculum_of(stage),
                                      completion_eos=data_args.completion_eos)
    trainer.save_model(sft_args.output_dir)
    report["prompt_completion"] = {"dir": sft_args.output_dir, "losses": logged_losses(trainer), "rows": len(rows),
                                   "curriculum": stage.curriculum}
    if sft_args.process_index == 0:
        _record_training(trainer.model, sft_args.output_dir, model_args, data_args, stage, report)
    return report


def run_two_stages(model_args: ModelArguments, data_args: DataArguments, hmt_args: Any, stage: StageArguments,
                   sft_args: Any, texts: list[str]) -> dict:
    """The paper's stage 1 (no recall, short chunks) and stage 2 (recall, long chunks) on text documents."""
    import peft
    from peft import get_peft_model_state_dict

    from hmt_adapter.integrations.trl import load_stage1_weights

    sft_args.max_length = None  # rows are chunked to the stage's length here, never truncated by TRL
    model, tokenizer = load_model_and_tokenizer(model_args)
    with sft_args.main_process_first(desc="tokenizing the documents"):
        docs = tokenize_documents(texts, tokenizer, data_args.concatenate_documents)
    report: dict[str, Any] = {"output_dir": sft_args.output_dir, "world_size": sft_args.world_size}
    stage1_weights: Any = stage.stage1_adapter
    if stage1_weights is None and stage.stage1_max_steps > 0:
        stage1_dir = os.path.join(sft_args.output_dir, "stage1")
        data = _stage_dataset(docs, stage.stage1_segments, hmt_args.segment_length)
        trainer = train_stage(model, hmt_config(hmt_args, use_recall=False, model_args=model_args), data, tokenizer, sft_args, stage, stage.stage1_max_steps, stage1_dir)
        report["stage1"] = {"dir": stage1_dir, "losses": logged_losses(trainer)}
        stage1_weights = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
        model = trainer.model.unload()  # the plain backbone again, for the stage-2 adapter
        del trainer
    peft_model = peft.get_peft_model(model, hmt_config(hmt_args, use_recall=True, model_args=model_args))
    if stage1_weights is not None:
        loaded = load_stage1_weights(peft_model, stage1_weights)
        report["stage2_init"] = {"loaded": len(loaded.loaded), "fresh_recall_params": loaded.missing_recall}
    data = _stage_dataset(docs, stage.stage2_segments, hmt_args.segment_length)
    trainer = train_stage(peft_model, None, data, tokenizer, sft_args, stage, stage.stage2_max_steps, sft_args.output_dir)
    report["stage2"] = {"dir": sft_args.output_dir, "losses": logged_losses(trainer)}
    if sft_args.process_index == 0:
        _record_training(trainer.model, sft_args.output_dir, model_args, data_args, stage, report)
    return report


def _record_training(model: Any, output_dir: str, model_args: ModelArguments, data_args: DataArguments,
                     stage: StageArguments, report: dict) -> None:
    """Add how the adapter was trained (and its last logged losses) to the saved adapter's model card."""
    from hmt_adapter.tuner.model_card import write_model_card

    config = model.peft_config["default"]
    data = data_args.dataset_name or os.path.basename(str(data_args.data_files))
    lines = [f"Trained with `hmt-adapter train` (TRL SFTTrainer) on {data}; backbone {model_args.model_name_or_path}"
             f"{' in 4 bits (nf4)' if model_args.load_in_4bit else ''}, frozen."]
    if "stage1" in report:
        lines.append(f"- stage 1 (no recall): {stage.stage1_max_steps} steps on {stage.stage1_segments}-segment rows")
    init = ", initialised from stage 1" if "stage2_init" in report else ""
    if "prompt_completion" in report:
        lines.append(f"- one stage with recall: {stage.stage2_max_steps} steps on whole prompt/completion rows, loss "
                     f"on the completion only{init}")
        if stage.curriculum:
            lines.append(f"- curriculum over input lengths: from {stage.curriculum_min_segments} segments to the "
                         f"longest row by {stage.curriculum_ramp_fraction:g} of training, rows read in order")
    else:
        lines.append(f"- stage 2 (recall): {stage.stage2_max_steps} steps on {stage.stage2_segments}-segment rows{init}")
        lines.append(f"- learning rate decays x{stage.lr_decay_factor} every {stage.lr_decay_steps} steps")
    results = {}
    for name in ("stage1", "stage2", "prompt_completion"):
        losses = report.get(name, {}).get("losses")
        if losses:
            results[f"{name} training loss (first -> last logged)"] = f"{losses[0]:.4f} -> {losses[-1]:.4f}"
    write_model_card(output_dir, config, training="\n".join(lines), results=results)


def recipe_and_overrides(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """(recipe path or None, the other flags) of ``RECIPE.yaml [--flag value ...]`` or ``--config RECIPE.yaml ...``."""
    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if token.startswith("--config="):
            return token.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    return None, argv


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """``hmt-adapter train RECIPE.yaml [--flag value ...]`` (also ``python -m hmt_adapter_cli.recipes --config
    RECIPE.yaml``)."""
    path, overrides = recipe_and_overrides(sys.argv[1:] if argv is None else argv)
    return run_recipe(*parse_recipe(path, overrides))


if __name__ == "__main__":
    main()
