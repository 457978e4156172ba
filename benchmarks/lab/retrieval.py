"""The retrieval lab's HMT training: the recipe's settings, its methods, the training episodes and the training
itself, shared by `benchmarks.long_context` (which also evaluates) and `benchmarks.write_init_onset` (which measures
only how soon training starts to work).

Each method is a pair of `HMTConfig` overrides and training-recipe overrides (``METHOD_SPECS``); `train_method`
trains one on episodes of real text (`benchmarks.lab.tasks`) with the product's own training code
(`hmt_adapter_cli.prompt_completion.train_prompt_completion`, which `hmt-adapter train` runs).
"""

from __future__ import annotations

import math
import random
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import peft
import torch
from datasets import Dataset
from trl import SFTConfig

from benchmarks.lab import tasks as T
from benchmarks.lab.pretrain import Prepared
from benchmarks.lab.settings import RETRIEVAL_QUICK, RetrievalSettings
from hmt_adapter import HMTConfig
from hmt_adapter_cli import prompt_completion as P

#: The current recipe (`--quick`'s HMT method, `hmt_write_init_null_decoy_border_spread_stable`): its HMTConfig
#: overrides and its training-recipe overrides, which the variants below start from.
_BORDER_CONFIG = {"write_token": "learned", "write_token_init_text": " The secret word is", "recall_null": True}
_BORDER_RECIPE = {"placement": "segment", "in_window_fraction": 0.25, "decoy_fraction": 0.5,
                  "question_border_fraction": 0.5, "hmt_max_grad_norm": 1.0, "hmt_schedule": "cosine"}

#: method -> (HMTConfig overrides, training-recipe overrides). "write" methods use a learned write token.
METHOD_SPECS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "hmt": ({}, {}),
    "hmt_write": ({"write_token": "learned"}, {}),
    "hmt_write_lora": ({"write_token": "learned", "lora_r": 8, "lora_alpha": 32}, {}),
    # the same with the LoRA weights at a backbone-sized learning rate (the memory parameters keep hmt_lr)
    "hmt_write_lora_slow": ({"write_token": "learned", "lora_r": 8, "lora_alpha": 32}, {"lora_lr": 1e-4}),
    # a zero-initialised gate on the recalled memory (segments start by reading m_0, as segment 0 does)
    "hmt_write_gate": ({"write_token": "learned", "memory_gate": True}, {}),
    # the training facts spread over every segment, a quarter of them inside the last one (do no harm)
    "hmt_write_spread": ({"write_token": "learned"}, {"placement": "segment", "in_window_fraction": 0.25}),
    "hmt_write_gate_spread": ({"write_token": "learned", "memory_gate": True},
                              {"placement": "segment", "in_window_fraction": 0.25}),
    # the same with clipped gradients and a cosine decay of the learning rate (a constant 1e-2 spiked and collapsed)
    "hmt_write_gate_spread_stable": ({"write_token": "learned", "memory_gate": True},
                                     {"placement": "segment", "in_window_fraction": 0.25, "hmt_max_grad_norm": 1.0,
                                      "hmt_schedule": "cosine"}),
    # ablations of that recipe: without the gate; without the spread facts (token depth, none in the last segment)
    "hmt_write_spread_stable": ({"write_token": "learned"},
                                {"placement": "segment", "in_window_fraction": 0.25, "hmt_max_grad_norm": 1.0,
                                 "hmt_schedule": "cosine"}),
    # that recipe with LoRA r=8 on the backbone at a backbone-sized rate (1e-3; the backbone was pretrained at 2e-3)
    "hmt_write_lora_spread_stable": ({"write_token": "learned", "lora_r": 8, "lora_alpha": 32},
                                     {"placement": "segment", "in_window_fraction": 0.25, "hmt_max_grad_norm": 1.0,
                                      "hmt_schedule": "cosine", "lora_lr": 1e-3}),
    # that recipe with the write token started at the embedding of the question's last token (" is")
    "hmt_write_init_spread_stable": ({"write_token": "learned", "write_token_init_text": " The secret word is"},
                                     {"placement": "segment", "in_window_fraction": 0.25, "hmt_max_grad_norm": 1.0,
                                      "hmt_schedule": "cosine"}),
    # that recipe with recall scores scaled by ln N (HMTConfig.recall_scale="log_n"): a recall that keeps its focus
    # over 1023 memories after training over at most 7
    "hmt_write_init_logn_spread_stable": ({"write_token": "learned", "write_token_init_text": " The secret word is",
                                           "recall_scale": "log_n"},
                                          {"placement": "segment", "in_window_fraction": 0.25,
                                           "hmt_max_grad_norm": 1.0, "hmt_schedule": "cosine"}),
    # that recipe with a recall query that reads the last segment up to the question (summary_fraction 0.95: 61 of 64
    # tokens, the question's words but not the answer): the paper's first half never sees a question at the end
    "hmt_write_init_query95_spread_stable": ({"write_token": "learned", "write_token_init_text": " The secret word is",
                                              "summary_fraction": 0.95},
                                             {"placement": "segment", "in_window_fraction": 0.25,
                                              "hmt_max_grad_norm": 1.0, "hmt_schedule": "cosine"}),
    # that recipe with a quarter of the beyond-window facts straddling a segment boundary, the answer opening a segment
    # (the held-out needle at depth 25% sits there at every length; uniform placement puts 1 in 64 facts there)
    "hmt_write_init_boundary_spread_stable": ({"write_token": "learned", "write_token_init_text": " The secret word is"},
                                              {"placement": "segment", "in_window_fraction": 0.25,
                                               "boundary_fraction": 0.25, "hmt_max_grad_norm": 1.0,
                                               "hmt_schedule": "cosine"}),
    # that recipe with a null slot in recall (HMTConfig.recall_null): one more entry, valued m_0, so a question whose
    # answer is in the window can read what segment 0 reads instead of the best of up to 1023 distractor memories
    "hmt_write_init_null_spread_stable": ({"write_token": "learned", "write_token_init_text": " The secret word is",
                                           "recall_null": True},
                                          {"placement": "segment", "in_window_fraction": 0.25,
                                           "hmt_max_grad_norm": 1.0, "hmt_schedule": "cosine"}),
    # that recipe with a decoy in half of the in-window episodes: a second key sentence, another key, beyond the window;
    # the answer is the key in the window (a memory that names a candidate must not outvote the window)
    "hmt_write_init_decoy_spread_stable": ({"write_token": "learned", "write_token_init_text": " The secret word is"},
                                           {"placement": "segment", "in_window_fraction": 0.25, "decoy_fraction": 0.5,
                                            "hmt_max_grad_norm": 1.0, "hmt_schedule": "cosine"}),
    # the same with the null slot (recall can then learn to read m_0 when a decoy would outvote the window)
    "hmt_write_init_null_decoy_spread_stable": ({"write_token": "learned", "write_token_init_text": " The secret word is",
                                                 "recall_null": True},
                                                {"placement": "segment", "in_window_fraction": 0.25,
                                                 "decoy_fraction": 0.5, "hmt_max_grad_norm": 1.0,
                                                 "hmt_schedule": "cosine"}),
    # the same with a decoy in every in-window episode (a quarter of the rows, not an eighth): rows of 32 segments
    # made recall commit to a distractor over the window; this makes such a read cost twice as often in training
    "hmt_write_init_null_alldecoy_spread_stable": ({"write_token": "learned",
                                                    "write_token_init_text": " The secret word is",
                                                    "recall_null": True},
                                                   {"placement": "segment", "in_window_fraction": 0.25,
                                                    "decoy_fraction": 1.0, "hmt_max_grad_norm": 1.0,
                                                    "hmt_schedule": "cosine"}),
    # the decoy recipe with half its rows ending the question just past a segment border (`question_tail`): with
    # longer rows, the held-out questions that end there are the ones the Python docs lose at 64k
    "hmt_write_init_null_decoy_border_spread_stable": (_BORDER_CONFIG, _BORDER_RECIPE),
    # the same with the recall query over 61 of 64 tokens (summary_fraction 0.95): a qa1 question names whose place
    # it asks at the end of the last segment, and the paper's query (the first half) never sees the name
    "hmt_write_init_null_decoy_border_query95_spread_stable": ({**_BORDER_CONFIG, "summary_fraction": 0.95},
                                                               _BORDER_RECIPE),
    # and with the write token started at " the", the last token of a qa1 question ("X is in the"), not " is"
    "hmt_write_initqa1_null_decoy_border_query95_spread_stable": ({**_BORDER_CONFIG, "summary_fraction": 0.95,
                                                                   "write_token_init_text": " X is in the"},
                                                                  _BORDER_RECIPE),
    "hmt_write_gate_stable": ({"write_token": "learned", "memory_gate": True},
                              {"hmt_max_grad_norm": 1.0, "hmt_schedule": "cosine"}),
    "hmt_write_no_recall": ({"write_token": "learned", "use_recall": False}, {}),
    "hmt_write_no_sensory": ({"write_token": "learned", "num_sensory": 0}, {}),
    "hmt_write_no_projection": ({"write_token": "learned", "memory_projection": False}, {}),
    # the recipe before this benchmark's levers: evidence anywhere, batch 2, lr 3e-3 cosine, clipped gradients
    "hmt_old_recipe": ({}, {"evidence": "anywhere", "hmt_batch": 2, "hmt_lr": 3e-3, "hmt_max_grad_norm": 1.0,
                            "hmt_schedule": "cosine", "curriculum": False}),
}
METHODS = (*METHOD_SPECS, "sliding_window")




@dataclass
class Settings(RetrievalSettings):
    """Every knob (the retrieval backbone's, `RetrievalSettings`, and these); defaults are the full protocol, `quick`
    scales it down."""

    hmt_seed: int = -1  # the adapter's initial weights and training draws (-1: the backbone's ``seed``)
    hmt_steps: int = 600
    hmt_batch: int = 16
    hmt_lr: float = 1e-2
    hmt_max_grad_norm: float = 0.0  # 0: no clipping (Adam's per-parameter scaling already bounds the steps)
    lora_lr: float = 0.0  # learning rate of the LoRA part of HMT + LoRA (0: the same as hmt_lr)
    hmt_schedule: str = "constant_with_warmup"
    hmt_logging_steps: int = 0  # log the training loss every this many steps (0: a tenth of the steps)
    evidence: str = "beyond"  # where training puts the supporting fact: "beyond" the window, or "anywhere"
    curriculum: bool = True  # the longest training input grows from 2 segments to the maximum ...
    curriculum_ramp_fraction: float = 0.5  # ... over this share of the steps
    min_train_segments: int = 2  # shortest training input (segments)
    placement: str = "depth"  # "depth": the fact at a uniform token depth; "segment": in a uniformly drawn segment
    in_window_fraction: float = 0.0  # share of training episodes with the fact inside the last segment (do no harm)
    boundary_fraction: float = 0.0  # share of the other ("segment" placement) facts whose answer opens a segment
    decoy_fraction: float = 0.0  # share of the in-window needle episodes with a decoy key sentence beyond the window
    question_border_fraction: float = 0.0  # share of rows whose question ends among the first 8 tokens of a segment
    train_tasks: tuple = ("needle",)
    max_train_segments: int = 16
    answer_only_loss: bool = True
    needle_lengths: tuple = (1024, 4096, 16384, 65536)
    facts_lengths: tuple = (1024, 4096, 16384)
    facts_tasks: tuple = ("facts_qa1", "facts_qa2")
    facts_examples: int = 50
    examples: int = 50
    examples_longest: int = 20
    needle_offsets: str = "depth"  # held-out needles: "depth" (the offset follows from the depth) or "spread"
    needle_depths: tuple = T.DEPTHS  # the held-out needles' depths, in turn
    eval_recall_window: int = 0  # > 0: scoring recalls over only the last this many memories (0: the adapter's own)
    eval_recall_sharpen_beyond: int = 0  # > 1: scoring sets HMTConfig.recall_sharpen_beyond to this (0: the adapter's own)
    methods: tuple = METHODS


#: What ``--quick`` changes beyond the quick backbone (`benchmarks.lab.settings.RETRIEVAL_QUICK`).
#: The recipe: rows of up to 32 segments, half of them ending the question just past a segment border (the lowest
#: 64k run of six 84%, against 73% with the 16-segment decoy recipe before it; BENCHMARKS.md).
QUICK = dict(num_sensory=8, recall_dim=128, hmt_steps=2000, max_train_segments=32,
             needle_lengths=(1024, 4096, 16384, 65536), facts_lengths=(1024, 4096), examples=30, examples_longest=20,
             facts_tasks=("facts_qa1",), facts_examples=20,
             methods=("sliding_window", "hmt_write_init_null_decoy_border_spread_stable"))


def quick(**overrides: Any) -> Settings:
    return Settings(**{**RETRIEVAL_QUICK, **QUICK, **overrides})


def adapter_seed(s: Settings) -> int:
    """The seed of the adapter's initial weights and training draws: ``hmt_seed``, or the backbone's ``seed``."""
    return s.seed if s.hmt_seed < 0 else s.hmt_seed


# ---- data ------------------------------------------------------------------------------------------------
def evidence_max_depth(s: Settings, length: int, num_sensory: int, evidence: str) -> float:
    """Deepest relative position of the supporting fact: ``"beyond"`` keeps it out of the last segment and its
    sensory memory (plus the question's ~12 tokens), so no training example can be answered without the memory."""
    if evidence == "anywhere":
        return 1.0
    if evidence != "beyond":
        raise ValueError(f"evidence must be 'beyond' or 'anywhere', got {evidence!r}.")
    return max(0.0, length - s.segment_length - num_sensory - 12) / length


def fact_depth(s: Settings, segments: int, num_sensory: int, rng: random.Random) -> tuple[float, bool]:
    """(relative depth of a training episode's supporting fact, whether it lies inside the last segment).

    With probability ``in_window_fraction`` the fact is put inside the last segment (the backbone's own window:
    training that HMT does not break what the backbone already answers). Otherwise it lies beyond the window
    (``evidence="beyond"``) or anywhere, at a uniform token depth (``placement="depth"``) or in a uniformly drawn
    segment (``placement="segment"``: a fact in segment 0 is no likelier than in any other segment).
    """
    length = segments * s.segment_length - 1
    if s.in_window_fraction > 0 and rng.random() < s.in_window_fraction:
        last = s.segment_length - 24  # room for the fact (~7 tokens) and the question (~12) inside the last segment
        return 1.0 - rng.random() * last / length, True
    if s.placement == "depth":
        if s.boundary_fraction > 0:
            raise ValueError("boundary_fraction places facts by segment: it needs placement='segment'.")
        return rng.random() * evidence_max_depth(s, length, num_sensory, s.evidence), False
    if s.placement != "segment":
        raise ValueError(f"placement must be 'depth' or 'segment', got {s.placement!r}.")
    beyond = s.evidence == "beyond"
    if s.boundary_fraction > 0 and segments > 2 and rng.random() < s.boundary_fraction:
        return boundary_depth(s, segments, rng), False
    segment = rng.randrange(segments - 1 if beyond else segments)
    start, end = segment * s.segment_length, (segment + 1) * s.segment_length
    if beyond and segment == segments - 2:
        end -= num_sensory + 8  # the fact (~7 tokens) must end before the last segment's sensory memory
    # anywhere from the segment's first token on, so a fact may straddle into the next segment (as real text does)
    return (start + rng.random() * max(1, end - start)) / length, False


#: A fact sentence (" The secret word is KEY.", " NAME went to the PLACE.") has its answer at token 4; a needle
#: episode's filler is its length less the needle (6 tokens) and the question (10).
ANSWER_INDEX, NEEDLE_EPISODE_EXTRA = 4, 16


def boundary_depth(s: Settings, segments: int, rng: random.Random) -> float:
    """A depth that puts the fact's answer among the first 4 tokens of a segment 1..segments-2 and the start of the
    sentence at the end of the segment before: the segment that holds the answer sees the rest only through its
    sensory memory. Exact in tokens for a needle episode (`benchmarks.lab.tasks.needle_example` scales a depth by
    the filler's length); the facts tasks plant more sentences, so there it lands within a few tokens of the
    boundary."""
    length = segments * s.segment_length - 1
    answer_at = rng.randint(1, segments - 2) * s.segment_length + rng.randint(0, 3)
    return (answer_at - ANSWER_INDEX) / (length - NEEDLE_EPISODE_EXTRA)


def decoy_depth(s: Settings, segments: int, num_sensory: int, rng: random.Random) -> float:
    """Where an in-window episode's decoy key sentence goes: a uniformly drawn segment before the last, ending before
    the last segment's sensory memory (beyond the window, as the facts recall must find)."""
    length = segments * s.segment_length - 1
    segment = rng.randrange(segments - 1)
    start, end = segment * s.segment_length, (segment + 1) * s.segment_length
    if segment == segments - 2:
        end -= num_sensory + 8
    return (start + rng.random() * max(1, end - start)) / length


def question_tail(rng: random.Random) -> int:
    """Tokens a question-border row adds to a whole number of segments less one: 2..9, so the question's last
    token (the one that predicts the answer) is among the first 8 tokens of a new segment.

    The held-out questions are text that is tokenized again, so their length drifts from the nominal one by a few
    tokens: on the Python docs about 4 in 10 end this way, the rest of the question and often the fact in the
    segment before, reached only through sensory memory and the recall of the latest memory. Rows of whole
    segments end a question there only when their own drift is 2 tokens or more."""
    return rng.randint(2, 9)


def train_dataset(tokenizer, stream, vocab, s: Settings, num_sensory: int):
    """Episodes of min..max_train_segments segments of ``s.train_tasks``, answer-only loss by default; a share
    ``decoy_fraction`` of the in-window needle episodes also carries a decoy key beyond the window (`decoy_depth`),
    and a share ``question_border_fraction`` of the rows (3 segments or more) ends its question just past a segment
    border (`question_tail`), its fact placed as in a row of one segment fewer."""
    rng = random.Random(adapter_seed(s) + 21)
    rows = {"input_ids": [], "completion_mask": []}
    total = s.hmt_steps * s.hmt_batch
    low = s.min_train_segments
    for i in range(total):
        longest = s.max_train_segments
        if s.curriculum:  # read in order (train_hmt samples sequentially): short first, the maximum by half-way
            longest = low + round((s.max_train_segments - low) * min(1.0, i / (s.curriculum_ramp_fraction * total)))
        segments = rng.randint(low, longest)
        full = segments  # whole segments before the question's end
        if s.question_border_fraction > 0 and segments >= 3 and rng.random() < s.question_border_fraction:
            full = segments - 1  # the question spills 1-8 tokens into one more, short segment (`question_tail`)
        length = full * s.segment_length - 1 + (question_tail(rng) if full < segments else 0)
        depth, in_window = fact_depth(s, full, num_sensory, rng)
        decoy = None
        if in_window and s.decoy_fraction > 0 and rng.random() < s.decoy_fraction:
            decoy = decoy_depth(s, full, num_sensory, rng)
        ids, answer_at = T.episode_ids(tokenizer, T.random_episode(tokenizer, stream, vocab, length, rng, s.train_tasks,
                                                                   depth=depth, decoy_depth=decoy))
        rows["input_ids"].append(ids)
        mask = [0] * answer_at + [1] * (len(ids) - answer_at) if s.answer_only_loss else [1] * len(ids)
        rows["completion_mask"].append(mask)
    return Dataset.from_dict(rows)


# ---- methods ---------------------------------------------------------------------------------------------
def hmt_config(method: str, s: Settings, tokenizer_path: Optional[str] = None,
               overrides: Optional[dict[str, Any]] = None):
    """The method's `HMTConfig`, with ``overrides`` on top; ``tokenizer_path`` (a saved tokenizer) for a write token
    that starts from text."""
    kwargs = dict(segment_length=s.segment_length, num_sensory=s.num_sensory, recall_dim=s.recall_dim,
                  recall_window=4096, recall_query=s.recall_query)
    kwargs.update(METHOD_SPECS[method][0])
    kwargs.update(overrides or {})
    if kwargs.get("write_token_init_text"):
        kwargs["tokenizer_name_or_path"] = tokenizer_path
    else:
        kwargs.pop("write_token_init_text", None)
    return HMTConfig(**kwargs)


def method_settings(method: str, s: Settings) -> Settings:
    """The settings a method trains with: the benchmark's recipe, with the method's own recipe overrides."""
    return replace(s, **METHOD_SPECS[method][1])


def train_hmt(backbone, tokenizer, dataset, method: str, s: Settings, work: str,
              tokenizer_path: Optional[str] = None, overrides: Optional[dict[str, Any]] = None):
    """Train the method's adapter on the episodes with the product's own training code: `hmt-adapter train` on
    prompt/completion data runs the same `train_prompt_completion`, so the evidence and the recipe cannot drift
    apart. The episodes already come in curriculum order (`train_dataset`) and are read in that order."""
    model = peft.get_peft_model(backbone, hmt_config(method, s, tokenizer_path, overrides))
    args = SFTConfig(
        output_dir=work, max_steps=s.hmt_steps, per_device_train_batch_size=s.hmt_batch, learning_rate=s.hmt_lr,
        lr_scheduler_type=s.hmt_schedule, warmup_steps=max(1, s.hmt_steps // 30), max_length=None,
        max_grad_norm=s.hmt_max_grad_norm, weight_decay=0.0,
        train_sampling_strategy="sequential" if s.curriculum else "random",
        completion_only_loss=True, gradient_checkpointing=False, logging_steps=s.hmt_logging_steps or max(1, s.hmt_steps // 10),
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=adapter_seed(s), disable_tqdm=True,
    )
    # lora_lr > 0: two parameter groups, LoRA (hmt_lora_*) at lora_lr and the memory parameters at hmt_lr
    trainer = P.train_prompt_completion(model, dataset, tokenizer, args,
                                        lora_learning_rate=s.lora_lr if s.lora_lr > 0 else None)
    return model.eval(), P.logged_losses(trainer)


def train_method(method: str, backbone, prep: Prepared, stream: list[int], s: Settings, out_dir: Path,
                 overrides: Optional[dict[str, Any]] = None, name: Optional[str] = None
                 ) -> tuple[Any, list[float], Optional[float]]:
    """Train ``method``'s adapter (its `HMTConfig` with ``overrides`` on top) on its episodes and save it under
    ``adapters/NAME`` (``name`` defaults to the method; for the recall diagnostics).
    Returns (the model, its logged training losses, tanh of its memory gate if it has one)."""
    ms = method_settings(method, s)
    tokenizer_path = out_dir / "tokenizer"  # for a write token that starts from text (and for the diagnostics)
    prep.tokenizer.save_pretrained(tokenizer_path)
    dataset = train_dataset(prep.tokenizer, stream, prep.vocab, ms,
                            hmt_config(method, s, str(tokenizer_path), overrides).num_sensory)
    torch.manual_seed(adapter_seed(s) + 31)  # HMT's initial weights: the same whether the backbone was cached or not
    with tempfile.TemporaryDirectory() as work:
        model, losses = train_hmt(backbone, prep.tokenizer, dataset, method, ms, work, str(tokenizer_path), overrides)
    model.save_pretrained(out_dir / "adapters" / (name or method))
    gate = [p for n, p in model.named_parameters() if "hmt_memory_gate" in n]
    return model, losses, math.tanh(gate[0].item()) if gate else None
