"""The knobs of the benchmarks that pretrain a tiny backbone and train HMT on it, as dataclasses.

`Settings` holds what they all share (seed, threads, tokenizer, backbone shape and pretraining, HMT and its training);
each benchmark extends it with its own knobs and its own defaults (a redeclared field keeps its place and changes
only its default). `RetrievalSettings` adds what the retrieval backbone's pretraining needs (the corpus, the in-window
task episodes, the stopping rule, the cache); the long-context benchmark, the memory probe and the recall
diagnostics all build that backbone. A run stores ``dataclasses.asdict(settings)`` in its JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass
class Settings:
    """A tiny backbone pretrained on windows of ``segment_length`` tokens, then frozen, and HMT trained on it. The
    defaults are the quality benchmark's full run; a subclass redeclares those it changes."""

    seed: int = 0
    threads: int = 2
    # tokenizer
    vocab_size: int = 4096
    # backbone
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    segment_length: int = 128  # the backbone's training window = HMT's segment length = the baselines' width
    pretrain_steps: int = 2000
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    # HMT
    num_sensory: int = 16
    recall_dim: int = 256
    recall_query: str = "segment"
    hmt_steps: int = 300
    hmt_batch: int = 2
    hmt_lr: float = 2e-3

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Settings from a run's stored ``settings`` (JSON lists back to tuples; keys of other settings ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})


@dataclass
class RetrievalSettings(Settings):
    """The retrieval backbone: pretrained on short windows of a corpus with in-window task episodes mixed in, until it
    answers in-window needles (`benchmarks.lab.pretrain.prepare`)."""

    pretrain_steps: int = 6000
    corpus: str = "python-docs"  # a name of benchmarks.lab.corpus.CORPORA, or a directory of *.rst.txt files
    corpus_dir: str = ""  # read the named corpus from here instead of its installed location
    backbone_cache: str = ""  # directory: reuse a pretrained backbone + tokenizer of the same corpus/seed/settings
    episode_fraction: float = 0.5  # windows of pretraining that are in-window task episodes
    answer_weight: float = 1.0  # extra cross-entropy on each episode's answer token (0: plain LM loss only)
    pretrain_check_every: int = 250
    pretrain_min_steps: int = 0  # keep pretraining at least this long even once the in-window target is reached
    target_in_window: float = 0.95  # pretraining stops once the backbone answers this share of in-window needles
    target_qa1_in_window: float = 0.0  # ... and this share of in-window qa1 questions (0: not a stopping condition)
    pretrain_tasks: tuple = ("needle", "needle", "facts_qa1", "facts_qa2")  # an episode's task, drawn from these
    pretrain_min_facts: int = 6  # < 6: a facts episode's number of facts is drawn from this..6 (easier ones mixed in)
    pretrain_weight_decay: float = 0.1  # AdamW's weight decay in pretraining
    pretrain_schedule: str = "constant"  # the lr after warm-up: 'constant', or 'cosine' (to 10% at pretrain_steps)
    drill_people: int = 3  # people in a facts_qa1_dense drill window (2..8)
    drill_question_share: float = 0.5  # share of a drill's sentences that are questions once someone has moved
    drill_stale_share: float = 0.0  # share of a drill's questions about the person named longest ago
    drill_filler_share: float = 0.0  # share of a drill's sentences that are a few tokens of corpus text instead
    drill_hard_after: float = 0.0  # > 0: stale questions, filler, spread only once the two-fact probe reaches this
    drill_spread: int = 0  # > 0: drills are episodes of 1..this many moves, the answer uniformly far back among them
    pretrain_tasks_bound: tuple = ()  # once the two-fact probe reaches 90% (the binding), episodes from these instead


#: The retrieval backbone of ``--quick`` runs (the one every retrieval result on record uses).
RETRIEVAL_QUICK = dict(vocab_size=2048, hidden_size=128, num_layers=2, num_heads=4, segment_length=64,
                       pretrain_steps=3000, pretrain_min_steps=2000, episode_fraction=0.5, pretrain_lr=2e-3, threads=1)


def quick_retrieval(**overrides: Any) -> RetrievalSettings:
    """`RetrievalSettings` of the ``--quick`` backbone (`RETRIEVAL_QUICK`), with ``overrides``."""
    return RetrievalSettings(**{**RETRIEVAL_QUICK, **overrides})
