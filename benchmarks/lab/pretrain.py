"""Pretraining the tiny backbone (`benchmarks.lab.backbone.tiny_backbone`) from scratch on short windows of a corpus.

Two recipes:

* `pretrain_until_plateau` (the quality benchmark): plain language modelling on random windows, AdamW with warm-up and
  cosine decay, stopped once the loss on fixed validation windows has flattened (`plateaued`);
* `pretrain_with_episodes` (the retrieval benchmarks): windows of the corpus, a share of them whole in-window task
  episodes (`benchmarks.lab.tasks`), stopped once the backbone answers in-window needles. `prepare` runs it together
  with the tokenizer and keeps the result in a cache folder (`backbone_key`), so runs of other seeds, methods or
  adapters on the same corpus reuse one backbone.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from benchmarks.lab import corpus as K
from benchmarks.lab import tasks as T
from benchmarks.lab.backbone import tiny_backbone
from benchmarks.lab.settings import RetrievalSettings, Settings
from benchmarks.lab.tokenizer import train_tokenizer


# ---- plain language modelling until the validation loss flattens ----------------------------------------------------
def plateaued(checks: Sequence[float], window: int, tolerance: float) -> bool:
    """The plateau rule: True when the best of the last ``window`` values is less than ``tolerance`` (relative)
    below the value just before them. False while there are fewer than ``window + 1`` values."""
    if window < 1:
        raise ValueError(f"plateau_checks must be >= 1, got {window}.")
    if len(checks) < window + 1:
        return False
    before = checks[-window - 1]
    return (before - min(checks[-window:])) / abs(before) < tolerance


def validation_windows(stream: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """``count`` fixed windows of ``width`` tokens spread evenly over ``stream``: (count, width)."""
    if stream.numel() < width + 1:
        raise ValueError(f"The validation stream has {stream.numel()} tokens, fewer than one window of {width} + 1.")
    starts = torch.linspace(0, stream.numel() - width, count).long().unique()
    return torch.stack([stream[s : s + width] for s in starts.tolist()])


@torch.no_grad()
def window_loss(model, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token NLL of ``model`` over the rows of ``windows`` (N, W), every row an independent window."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total / count


def _warmup_cosine(optim, total_steps: int, warmup: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% at ``total_steps``."""
    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optim, lr_at)


def _adamw(model, lr: float, weight_decay: float = 0.1):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))


def _step(model, optim, sched, loss: torch.Tensor) -> None:
    """One optimiser step: backward, gradients clipped at 1.0, AdamW, the schedule."""
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optim.step()
    sched.step()


def pretrain_until_plateau(model, stream: torch.Tensor, validation: torch.Tensor, s: Settings, *, eval_every: int,
                           checks: int, tolerance: float) -> dict:
    """Train on random windows of ``segment_length`` tokens of ``stream`` (AdamW, warm-up + cosine to 10% over the
    cap ``pretrain_steps``) until the loss on the fixed ``validation`` windows, scored every ``eval_every`` steps,
    has flattened (`plateaued` over ``checks`` checks by ``tolerance``) or the cap is reached. Returns the training
    losses, the validation curve and why it stopped."""
    gen = torch.Generator().manual_seed(s.seed + 1)
    window = s.segment_length
    optim = _adamw(model, s.pretrain_lr)
    sched = _warmup_cosine(optim, s.pretrain_steps, max(1, s.pretrain_steps // 20))
    losses: list[float] = []
    curve = [{"step": 0, "validation_loss": window_loss(model, validation)}]
    stopped = "max_steps"
    model.train()
    for step in range(1, s.pretrain_steps + 1):
        starts = torch.randint(0, stream.numel() - window, (s.pretrain_batch,), generator=gen)
        ids = torch.stack([stream[i : i + window] for i in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        _step(model, optim, sched, loss)
        losses.append(loss.item())
        if step % eval_every == 0:
            curve.append({"step": step, "validation_loss": window_loss(model, validation),
                          "train_loss": sum(losses[-eval_every:]) / eval_every, "lr": sched.get_last_lr()[0]})
            print(f"  pretraining step {step}: validation loss {curve[-1]['validation_loss']:.4f}, training loss "
                  f"{curve[-1]['train_loss']:.4f}, lr {curve[-1]['lr']:.2e}", flush=True)
            if plateaued([c["validation_loss"] for c in curve], checks, tolerance):
                stopped = "plateau"
                break
    model.eval()
    model.requires_grad_(False)
    return {"losses": losses, "validation_curve": curve, "stopped": stopped, "steps": len(losses)}


# ---- windows with in-window task episodes, until the backbone answers in-window needles -----------------------------
#: The pretraining-only task of `benchmarks.lab.tasks.facts_dense_row` (a whole window of qa1 drill, several answers).
DENSE = "facts_qa1_dense"

#: The tasks a pretraining episode can be (``pretrain_tasks``, ``pretrain_tasks_bound``).
PRETRAIN_TASKS = ("needle", "facts_qa1", "facts_qa2", "facts_qa1_drill", DENSE)

#: The two-fact probe's accuracy that shows the binding (a name read back to its place with a second person beside
#: it): from here ``pretrain_tasks_bound`` replaces ``pretrain_tasks``.
BINDING = 0.9


def _episode_batch(tokenizer, stream: torch.Tensor, filler: list[int], vocab, s: RetrievalSettings,
                   rng: random.Random, gen: torch.Generator) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(batch of windows, the (row, index) of every answer token): each row an episode (left-padded, its answer the
    last token) with probability ``episode_fraction``, else a random window of the corpus. With `DENSE` among
    ``pretrain_tasks`` an episode is, in that share, a window of qa1 drill with several answers instead."""
    window = s.segment_length
    tasks = tuple(s.pretrain_tasks)
    rows, answers = [], []
    for i in range(s.pretrain_batch):
        if rng.random() < s.episode_fraction:
            if DENSE in tasks and rng.random() < tasks.count(DENSE) / len(tasks):
                ids, at = T.facts_dense_row(tokenizer, vocab, window, rng, s.drill_people, s.drill_question_share,
                                            s.drill_stale_share, s.drill_filler_share, filler, s.drill_spread)
                answers += [(i, j) for j in at]
            else:
                episode = T.random_episode(tokenizer, filler, vocab, window - 2, rng,
                                           tuple(t for t in tasks if t != DENSE), min_facts=s.pretrain_min_facts)
                ids, _ = T.episode_ids(tokenizer, episode)
                ids = ids[-window:]
                ids = [0] * (window - len(ids)) + ids  # left-padded: the answer is the last token
                answers.append((i, window - 1))
        else:
            start = int(torch.randint(0, stream.numel() - window, (1,), generator=gen))
            ids = stream[start : start + window].tolist()
        rows.append(ids)
    return torch.tensor(rows), answers


def check_episode_settings(s: RetrievalSettings, names: int = len(T.NAMES)) -> None:
    """ValueError naming the first pretraining-episode setting of ``s`` out of its range (``names``: how many names
    the task vocabulary has, at most `benchmarks.lab.tasks.NAMES`)."""
    for field in ("pretrain_tasks", "pretrain_tasks_bound"):
        tasks = getattr(s, field)
        if DENSE in tasks and len(set(tasks)) == 1:
            raise ValueError(f"{field} {DENSE!r} needs another task beside it (its rows are drills, the held-out "
                             "questions are not).")
        unknown = sorted(set(tasks) - set(PRETRAIN_TASKS))
        if unknown:
            raise ValueError(f"{field} has unknown tasks {unknown}; choose from {list(PRETRAIN_TASKS)}.")
    if not 2 <= s.drill_people <= names:
        raise ValueError(f"drill_people must be in 2..{names} (the names of the task vocabulary), got "
                         f"{s.drill_people}.")
    if not 0.0 < s.drill_question_share < 1.0:
        raise ValueError(f"drill_question_share must be in (0, 1) (the share of a drill's sentences that are "
                         f"questions), got {s.drill_question_share}.")
    if not 0.0 <= s.drill_stale_share <= 1.0:
        raise ValueError(f"drill_stale_share must be in [0, 1] (a share of a drill's questions), got "
                         f"{s.drill_stale_share}.")
    if not 0.0 <= s.drill_filler_share < 1.0:
        raise ValueError(f"drill_filler_share must be in [0, 1) (a share of a drill's sentences), got "
                         f"{s.drill_filler_share}.")
    if not 0.0 <= s.drill_hard_after <= 1.0:
        raise ValueError(f"drill_hard_after must be in [0, 1] (a two-fact probe accuracy; 0: from the start), got "
                         f"{s.drill_hard_after}.")
    if s.drill_spread != 0 and not 2 <= s.drill_spread <= 12:
        raise ValueError(f"drill_spread must be 0 (off) or in 2..12 (the most moves before a drill question), got "
                         f"{s.drill_spread}.")
    asks_its_own = s.drill_stale_share > 0 or s.drill_question_share != RetrievalSettings.drill_question_share
    if s.drill_spread and asks_its_own:
        raise ValueError("drill_spread sets where each drill question goes and whom it asks: it takes neither "
                         "drill_stale_share nor drill_question_share.")
    if s.pretrain_schedule not in ("constant", "cosine"):
        raise ValueError(f"pretrain_schedule must be 'constant' or 'cosine', got {s.pretrain_schedule!r}.")
    if not 1 <= s.pretrain_min_facts <= 6:
        raise ValueError(f"pretrain_min_facts must be in 1..6 (facts in a pretraining episode), got "
                         f"{s.pretrain_min_facts}.")


def pretrain_with_episodes(model, tokenizer, stream: torch.Tensor, vocab, s: RetrievalSettings,
                           log: Callable[[str], None]) -> dict[str, Any]:
    """Short windows of the corpus, a fraction of them whole task episodes that fit in the window, until the
    backbone answers in-window needles (``target_in_window``) and in-window qa1 questions
    (``target_qa1_in_window``), not before ``pretrain_min_steps``, or ``pretrain_steps`` run out. Both in-window
    accuracies are logged at every check."""
    check_episode_settings(s, len(vocab.names))
    rng = random.Random(s.seed + 11)
    gen = torch.Generator().manual_seed(s.seed + 1)
    filler = stream.tolist()
    window = s.segment_length
    probe_rng = random.Random(s.seed + 12)
    probe = [T.needle_example(tokenizer, filler, vocab, window - 2, probe_rng.random(), probe_rng) for _ in range(64)]
    qa1_rng = random.Random(s.seed + 13)
    qa1_probe = [T.facts_example(tokenizer, filler, vocab, window - 2, qa1_rng.random(), qa1_rng) for _ in range(64)]
    binding_probe = T.binding_examples(tokenizer, vocab, 64, random.Random(s.seed + 14))
    optim = _adamw(model, s.pretrain_lr, s.pretrain_weight_decay)
    warmup = max(1, s.pretrain_steps // 50)
    if s.pretrain_schedule == "cosine":
        sched = _warmup_cosine(optim, s.pretrain_steps, warmup)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: min(1.0, (step + 1) / warmup))
    model.train()
    losses, curve = [], []
    # drills with stale questions, filler or spread only once the two-fact probe shows the binding (drill_hard_after)
    hard_from = 0 if s.drill_hard_after <= 0 else None
    easy = replace(s, drill_stale_share=0.0, drill_filler_share=0.0, drill_spread=0)
    # and the episodes of pretrain_tasks_bound in place of pretrain_tasks once the probe shows it (BINDING)
    bound_from: Optional[int] = None
    for step in range(1, s.pretrain_steps + 1):
        now = s if hard_from is not None else easy
        if bound_from is not None:
            now = replace(now, pretrain_tasks=s.pretrain_tasks_bound)
        batch, answers = _episode_batch(tokenizer, stream, filler, vocab, now, rng, gen)
        out = model(input_ids=batch, labels=batch.masked_fill(batch == 0, -100))
        loss = out.loss
        if s.answer_weight > 0 and answers:  # an answer is 1 token in a window: weight it up, or it is never learned
            rows, at = torch.tensor(answers).T
            answer_logits = out.logits[rows, at - 1]  # (A, V): the positions that predict the answer tokens
            loss = loss + s.answer_weight * torch.nn.functional.cross_entropy(answer_logits, batch[rows, at])
        _step(model, optim, sched, loss)
        losses.append(out.loss.item())
        if step % s.pretrain_check_every == 0 or step == s.pretrain_steps:
            acc = T.in_window_accuracy(model, tokenizer, probe)
            qa1 = T.in_window_accuracy(model, tokenizer, qa1_probe)
            binding = T.in_window_accuracy(model, tokenizer, binding_probe)
            curve.append({"step": step, "loss": sum(losses[-20:]) / len(losses[-20:]), "needle_in_window": acc,
                          "qa1_in_window": qa1, "qa1_two_facts": binding})
            log(f"pretraining step {step}: loss {curve[-1]['loss']:.2f}, in-window accuracy: needle {100 * acc:.0f}%, "
                f"qa1 {100 * qa1:.0f}% (two facts, no filler: {100 * binding:.0f}%)")
            if hard_from is None and binding >= s.drill_hard_after:
                hard_from = step
                log(f"pretraining step {step}: the two-fact probe reached {100 * s.drill_hard_after:.0f}%: drills "
                    f"with stale questions ({s.drill_stale_share}), filler ({s.drill_filler_share}) and spread "
                    f"({s.drill_spread}) from here")
            if s.pretrain_tasks_bound and bound_from is None and binding >= BINDING:
                bound_from = step
                log(f"pretraining step {step}: the two-fact probe reached {100 * BINDING:.0f}%: episodes from "
                    f"{list(s.pretrain_tasks_bound)} from here")
            if acc >= s.target_in_window and qa1 >= s.target_qa1_in_window and step >= s.pretrain_min_steps:
                break
    model.eval().requires_grad_(False)
    return {"losses": losses[::10], "curve": curve, "steps": step, "drills_hard_from": hard_from,
            "tasks_bound_from": bound_from}


# ---- the retrieval benchmarks' shared start: corpus, tokenizer, frozen backbone (cached) ----------------------------
@dataclass
class Prepared:
    """The corpus, tokenizer and frozen backbone every method of a retrieval benchmark shares."""

    tokenizer: Any
    vocab: T.Vocab
    train_stream: torch.Tensor
    heldout_stream: list
    backbone: Any
    pretraining: dict


def corpus_of(s: RetrievalSettings) -> K.Corpus:
    return K.get(s.corpus, s.corpus_dir or None)


def corpus_problem(s: RetrievalSettings) -> Optional[str]:
    """Why the corpus of ``s`` cannot be read (an unknown name, a package not installed: its install command), or
    None when it can."""
    try:
        corpus = corpus_of(s)
    except ValueError as err:
        return str(err)
    return None if corpus.documents() else corpus.missing_message()


#: What the pretrained backbone and tokenizer depend on (the cache key; changing it orphans every cached backbone).
BACKBONE_FIELDS = ("corpus", "seed", "vocab_size", "hidden_size", "num_layers", "num_heads", "segment_length",
                   "pretrain_steps", "pretrain_batch", "pretrain_lr", "episode_fraction", "answer_weight",
                   "pretrain_check_every", "pretrain_min_steps", "target_in_window")


#: Fields the backbone depends on that came later: in the key only when they differ from their defaults, so the
#: backbones cached before them keep their keys.
LATER_BACKBONE_FIELDS = ("target_qa1_in_window", "pretrain_tasks", "pretrain_min_facts", "pretrain_weight_decay",
                         "drill_people", "drill_question_share", "pretrain_schedule",
                         "drill_stale_share", "drill_filler_share", "drill_hard_after", "drill_spread",
                         "pretrain_tasks_bound")


def backbone_key(s: RetrievalSettings) -> str:
    """`BACKBONE_FIELDS` as a short hash, prefixed with the corpus and seed (the cache's folder name)."""
    spec = {f: getattr(s, f) for f in BACKBONE_FIELDS}
    defaults = RetrievalSettings()
    spec.update({f: list(getattr(s, f)) if isinstance(getattr(s, f), tuple) else getattr(s, f)
                 for f in LATER_BACKBONE_FIELDS if getattr(s, f) != getattr(defaults, f)})
    spec = json.dumps(spec, sort_keys=True)
    return f"{s.corpus}-seed{s.seed}-" + hashlib.sha256(spec.encode()).hexdigest()[:10]


def prepare(s: RetrievalSettings, log: Callable[[str], None]) -> Prepared:
    """Tokenizer trained on the corpus's training documents, and the backbone pretrained on short windows
    (with in-window episodes) until it answers in-window needles, then frozen. With ``backbone_cache`` the
    tokenizer and backbone of an earlier run with the same corpus, seed and pretraining settings are reused."""
    train_texts, heldout_texts = K.split(corpus_of(s).documents(), 0.15)
    cached = Path(s.backbone_cache) / backbone_key(s) if s.backbone_cache else None
    hit = cached is not None and (cached / "pretraining.json").is_file()
    if hit:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(cached / "tokenizer")
        backbone = AutoModelForCausalLM.from_pretrained(cached / "backbone")
        pre = json.loads((cached / "pretraining.json").read_text())
        log(f"backbone and tokenizer reused from {cached}")
    else:
        tokenizer = train_tokenizer(train_texts + [T.task_sentences()], s.vocab_size)
    vocab = T.Vocab.of(tokenizer)
    encode = lambda texts: [t for doc in tokenizer(texts, add_special_tokens=False).input_ids for t in doc]  # noqa: E731
    train_stream, heldout_stream = torch.tensor(encode(train_texts)), encode(heldout_texts)
    log(f"corpus {s.corpus}: {len(train_texts)} training / {len(heldout_texts)} held-out documents, "
        f"{train_stream.numel():,} / {len(heldout_stream):,} tokens; answers: {len(vocab.keys)} keys, "
        f"{len(vocab.places)} places")
    if not hit:
        backbone = tiny_backbone(s, len(tokenizer))
        pre = pretrain_with_episodes(backbone, tokenizer, train_stream, vocab, s, log)
        log(f"backbone pretrained on {s.segment_length}-token windows for {pre['steps']} steps")
        if cached is not None:
            backbone.save_pretrained(cached / "backbone")
            tokenizer.save_pretrained(cached / "tokenizer")
            (cached / "pretraining.json").write_text(json.dumps(pre))
    backbone.eval().requires_grad_(False)
    return Prepared(tokenizer, vocab, train_stream, heldout_stream, backbone, pre)
