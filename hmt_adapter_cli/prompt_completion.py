"""Training HMT on prompt/completion rows: the code ``hmt-adapter train`` and the long-context benchmark share.

A row is TRL's prompt-completion format: a ``prompt`` (a long document and a question, say) and a ``completion``
(the answer). The loss is on the completion only and every row is read whole, never chunked nor truncated, so the
memory has to carry what the completion needs from wherever it lies in the prompt. `train_prompt_completion` trains
one HMT stage (recall on) on such rows with TRL's `SFTTrainer`, optionally in a curriculum over input lengths
(`Curriculum`). Rows may also come tokenized, as ``input_ids`` with a ``completion_mask`` (1 on the tokens to
score), which is how `benchmarks/long_context.py` builds its episodes.

What the long-context benchmark measured to work with a frozen backbone (``recipes/retrieval-tiny.yaml`` is the
recipe): ``HMTConfig(write_token="learned", write_token_init_text=...)`` with the write token started at the
embedding of the words that end the prompts before the answer (no memory gate: a closed gate kept the memory from
starting to learn), the curriculum (short inputs first, every length by half-way), a learning rate of 1e-2 with a
cosine decay after ~1/30 of the steps of warmup, gradient clipping at 1.0, batch 16, no weight decay, and, on the
data side, facts spread over every segment of the prompts with about a quarter of them inside the last segment, so
the adapter also learns not to break what the backbone answers in its own window.

The frameworks are imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

PROMPT, COMPLETION = "prompt", "completion"
DATA_FORMATS = ("auto", "text", "prompt_completion")


@dataclass(frozen=True)
class Curriculum:
    """Short inputs first: the longest input allowed grows from ``min_segments`` segments to the longest row over
    the first ``ramp_fraction`` of training (`hmt_adapter.integrations.trl.curriculum_order`)."""

    min_segments: int = 2
    ramp_fraction: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.min_segments, bool) or not isinstance(self.min_segments, int) or self.min_segments < 1:
            raise ValueError(f"curriculum_min_segments must be an integer >= 1, got {self.min_segments!r}.")
        if not 0.0 < self.ramp_fraction <= 1.0:
            raise ValueError(f"curriculum_ramp_fraction must be in (0, 1], got {self.ramp_fraction!r}.")


# ---- the data ------------------------------------------------------------------------------------------------
def resolve_data_format(columns: Sequence[str], requested: str, source: str) -> str:
    """``"prompt_completion"`` or ``"text"`` for data with ``columns`` (``requested``: one of `DATA_FORMATS`).

    ``"auto"`` picks prompt_completion when both columns are there; a prompt without a completion (or the other way
    round) is a `ValueError` rather than a silent fall-back to text.
    """
    if requested not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {requested!r}.")
    if requested == "text":
        return "text"
    present = [c for c in (PROMPT, COMPLETION) if c in columns]
    if requested == "auto" and not present:
        return "text"
    if len(present) < 2:
        missing = COMPLETION if PROMPT in present else PROMPT
        raise ValueError(
            f"{source} has no {missing!r} column (columns: {list(columns)}): prompt/completion data need a 'prompt' "
            f"and a 'completion' field in every row (rename the columns, or set data_format: text and text_field "
            f"for plain documents)."
        )
    return "prompt_completion"


def _problem(prompt: Any, completion: Any) -> Optional[str]:
    """What is wrong with one row, or None."""
    for name, value in ((PROMPT, prompt), (COMPLETION, completion)):
        if value is None:
            return f"no {name!r}"
        if not isinstance(value, (str, list)):
            return f"a {name!r} that is neither text nor a list of chat messages ({type(value).__name__})"
    if not (completion.strip() if isinstance(completion, str) else completion):
        return "an empty 'completion'"
    return None


def check_rows(dataset: Any, source: str = "the training data") -> None:
    """One-line `ValueError` naming the first row without a prompt or with a missing or empty completion."""
    for i, (prompt, completion) in enumerate(zip(dataset[PROMPT], dataset[COMPLETION])):
        problem = _problem(prompt, completion)
        if problem:
            raise ValueError(
                f"{source}: row {i + 1} has {problem}; every prompt/completion row needs a 'prompt' and a non-empty "
                f"'completion' (the answer to learn): fix or remove that row."
            )


def prompt_end_text(prompts: Sequence[str], tokenizer: Any, sample: int = 2000) -> tuple[str, float]:
    """The text to start HMT's write token from (``HMTConfig.write_token_init_text``) for prompt/completion data: a
    tail of a prompt whose last token is the most common last token of the prompts (of the first ``sample``), and
    the share of those prompts that end with it. The tail is checked to tokenize to that same last token.

    Raises ``ValueError`` when no prompt has a token, or no tail of a prompt reproduces its last token."""
    ends: dict[int, list[str]] = {}
    for prompt in prompts[:sample]:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        if ids:
            ends.setdefault(ids[-1], []).append(prompt)
    if not ends:
        raise ValueError("write_token_init_text: auto found no prompt with a token; set write_token_init_text to the "
                         "words that come right before the answers.")
    token, with_it = max(ends.items(), key=lambda item: len(item[1]))
    share = len(with_it) / sum(len(v) for v in ends.values())
    for prompt in with_it[:20]:
        for width in (8, 16, 32, 64):
            tail = prompt[-width:]
            if tokenizer(tail, add_special_tokens=False).input_ids[-1:] == [token]:
                return tail, share
    decoded = tokenizer.decode([token])
    if decoded and tokenizer(decoded, add_special_tokens=False).input_ids[-1:] == [token]:
        return decoded, share
    raise ValueError(f"write_token_init_text: auto could not find a text that ends on the prompts' last token "
                     f"{decoded!r} (id {token}); set write_token_init_text to the words before the answers.")


# ---- the curriculum ------------------------------------------------------------------------------------------
def run_rows(num_rows: int, rows_read: int, seed: int) -> list[int]:
    """The rows a run of ``rows_read`` rows reads: the data repeated as a whole, the rest a seeded sample of it."""
    if num_rows < 1:
        raise ValueError("The training data have no rows.")
    full, rest = divmod(rows_read, num_rows)
    return list(range(num_rows)) * full + sorted(random.Random(seed).sample(range(num_rows), rest))


def curriculum_rows(lengths: Sequence[int], rows_read: int, segment_length: int, curriculum: Curriculum,
                    seed: int) -> list[int]:
    """Indices into the data of the ``rows_read`` rows a run reads, in curriculum order (read them sequentially).

    The ramp spans the whole run, not one pass over the data: the data are repeated or sampled to the run's length
    (`run_rows`) first, then ordered by `hmt_adapter.integrations.trl.curriculum_order` on their token counts.
    """
    from hmt_adapter.integrations.trl import curriculum_order

    rows = run_rows(len(lengths), rows_read, seed)
    order = curriculum_order([lengths[r] for r in rows], segment_length, curriculum.min_segments,
                             curriculum.ramp_fraction, seed)
    return [rows[i] for i in order]


def _global_batch(args: Any) -> int:
    """Rows per optimizer step: every process, every accumulation micro-batch."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def _steps(args: Any, num_rows: int) -> int:
    """The optimizer steps of a run with ``args`` on ``num_rows`` rows."""
    return args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * num_rows / _global_batch(args))


# ---- training ------------------------------------------------------------------------------------------------
def _two_rate_optimizer(model: Any, lora_learning_rate: float, args: Any):
    """AdamW with the LoRA weights (``hmt_lora_*``) at ``lora_learning_rate`` and the memory parameters at
    ``args.learning_rate`` (HMT + LoRA with LoRA at a backbone-sized rate)."""
    import torch

    from hmt_adapter.tuner.weights import LORA_KEY_MARKER

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if LORA_KEY_MARKER in n], "lr": lora_learning_rate},
              {"params": [p for n, p in trainable if LORA_KEY_MARKER not in n], "lr": args.learning_rate}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=args.weight_decay)


def drop_final_eos(dataset: Any, eos_token_id: int) -> Any:
    """Tokenized rows without the EOS token that ends them (TRL appends one to every completion)."""
    columns = [c for c in ("input_ids", "labels", "completion_mask", "attention_mask") if c in dataset.column_names]

    def drop(row: dict) -> dict:
        ends = bool(row["input_ids"]) and row["input_ids"][-1] == eos_token_id
        return {c: row[c][:-1] if ends else row[c] for c in columns}

    return dataset.map(drop, desc="Dropping the final EOS")


def _segment_length(model: Any, peft_config: Any) -> int:
    config = peft_config if peft_config is not None else model.peft_config[model.active_adapter]
    return config.segment_length


def train_prompt_completion(
    model: Any,
    dataset: Any,
    tokenizer: Any,
    sft_args: Any,
    *,
    peft_config: Any = None,
    curriculum: Optional[Curriculum] = None,
    lora_learning_rate: Optional[float] = None,
    completion_eos: bool = True,
):
    """Train one HMT stage on whole prompt/completion rows with the loss on the completion; returns the trainer.

    Args:
        model: a `PeftModel` with an HMT adapter, or a backbone with ``peft_config`` (an `HMTConfig`).
        dataset: a `datasets.Dataset` with ``prompt`` and ``completion`` (text or chat messages), or tokenized rows
            with ``input_ids`` and ``completion_mask``.
        tokenizer: the backbone's tokenizer (TRL's ``processing_class``).
        sft_args: TRL's `SFTConfig`; used as given (learning rate, schedule, clipping, batch, seed, ...), except that
            ``max_length`` never truncates: rows longer than a ``max_length`` that is not None are a `ValueError`
            (`hmt_adapter.integrations.trl.check_max_length`), and ``completion_only_loss`` None means True.
        curriculum: order the rows the run reads by `curriculum_rows` and read them in order
            (``train_sampling_strategy="sequential"``); None leaves the trainer's sampling as configured.
        lora_learning_rate: a separate learning rate for HMT's LoRA weights (needs a `PeftModel`).
        completion_eos: False drops the EOS token that ends each tokenized row (TRL appends one to every
            completion), so only the completion's own tokens are scored.

    The trained adapter is ``trainer.model``; saving it is the caller's choice (``trainer.save_model(dir)``).
    """
    from trl import SFTTrainer

    from hmt_adapter.integrations.trl import check_max_length, check_sft_args

    args = copy.deepcopy(sft_args)
    limit, args.max_length = args.max_length, None  # checked below instead: a row is never cut
    if args.completion_only_loss is None:  # TRL's None means False for tokenized rows with a completion_mask
        args.completion_only_loss = True
    if curriculum is not None:
        args.train_sampling_strategy = "sequential"
        args.max_steps = _steps(args, len(dataset))  # the rows are laid out for the whole run, read once
    check_sft_args(args)
    if PROMPT in dataset.column_names:
        check_rows(dataset)
    optimizers: tuple = (None, None)
    if lora_learning_rate:
        if peft_config is not None or not hasattr(model, "peft_config"):
            raise ValueError("lora_learning_rate needs the model with its HMT adapter attached (peft.get_peft_model) "
                             "rather than a backbone and peft_config.")
        optimizers = (_two_rate_optimizer(model, lora_learning_rate, args), None)
    trainer = SFTTrainer(model=model, peft_config=peft_config, args=args, train_dataset=dataset,
                         processing_class=tokenizer, optimizers=optimizers)
    if not completion_eos:
        text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor holds one; TRL set its eos_token
        trainer.train_dataset = drop_final_eos(trainer.train_dataset, text_tokenizer.eos_token_id)
    check_max_length(trainer.train_dataset, limit)
    if curriculum is not None:
        lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
        seed = args.data_seed if args.data_seed is not None else args.seed
        order = curriculum_rows(lengths, args.max_steps * _global_batch(args),
                                _segment_length(trainer.model, peft_config), curriculum, seed)
        trainer.train_dataset = trainer.train_dataset.select(order)
    trainer.train()
    return trainer


def logged_losses(trainer: Any) -> list[float]:
    """The training losses the trainer logged (every ``logging_steps``)."""
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]
