"""Behavioural performance invariants (issue 5), without wall-clock asserts.

* On TRL's fused path and with ``logits_to_keep=1`` no (B, T, V) logits exist: every tensor whose last
  dimension is the vocabulary holds at most one segment's worth of rows, forward and backward.
* With gradient checkpointing, what autograd stores per extra segment is a small fraction of what it
  stores without it.
"""

from __future__ import annotations

import peft
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hmt_adapter import HMTConfig
from hmt_adapter import testing as hmt_testing

VOCAB = 256  # differs from every other width of the tiny model, so "last dim == VOCAB" means logits
SEG = 16
SEGMENTS = 4
BATCH = 2


class _VocabRows(TorchDispatchMode):
    """Records the largest number of rows (numel / V) of any newly allocated op output whose last dim is V.

    Views of inputs (e.g. the transposed LM-head weight) allocate nothing and are skipped.
    """

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.max_rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        storages = {a.untyped_storage().data_ptr() for a in inputs}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[-1] != self.vocab:
                continue
            if t.untyped_storage().data_ptr() not in storages:
                self.max_rows = max(self.max_rows, t.numel() // self.vocab)
        return out


def _hmt(**overrides) -> torch.nn.Module:
    base = hmt_testing.tiny_causal_lm("llama", vocab_size=VOCAB)
    config = HMTConfig(task_type="CAUSAL_LM", segment_length=SEG, num_sensory=4, recall_dim=32, **overrides)
    return peft.get_peft_model(base, config)


def _head_rows(model) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    rows: list[int] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _m, args: rows.append(args[0].numel() // args[0].shape[-1]))
    return rows, handle


def _ids() -> torch.Tensor:
    return torch.randint(4, VOCAB, (BATCH, SEG * SEGMENTS), generator=torch.Generator().manual_seed(1))


def test_fused_path_never_builds_more_than_one_segment_of_logits() -> None:
    model = _hmt()
    model.train()
    ids = _ids()
    rows, handle = _head_rows(model)
    with _VocabRows(VOCAB) as probe:
        out = model(input_ids=ids, labels=ids, fused_lm_head=True)
        out.loss.backward()
    handle.remove()
    assert out.log_probs.shape == (BATCH, SEG * SEGMENTS - 1)
    assert probe.max_rows > 0  # the head did run
    assert probe.max_rows <= BATCH * SEG
    assert all(r <= BATCH * SEG for r in rows)


def test_logits_to_keep_one_never_builds_more_than_one_segment_of_logits() -> None:
    model = _hmt()
    model.eval()
    ids = _ids()
    rows, handle = _head_rows(model)
    with torch.no_grad(), _VocabRows(VOCAB) as probe:
        out = model(input_ids=ids, labels=ids, logits_to_keep=1)
    handle.remove()
    assert out.logits.shape == (BATCH, 1, VOCAB)
    assert probe.max_rows <= BATCH * SEG
    assert rows and all(r <= BATCH for r in rows)  # the module head only ever sees the kept positions


def test_probe_sees_full_logits_when_they_are_requested() -> None:
    """The probe can fail: asking for every token's logits does build (B, T, V)."""
    model = _hmt()
    model.eval()
    with torch.no_grad(), _VocabRows(VOCAB) as probe:
        model(input_ids=_ids())
    assert probe.max_rows >= BATCH * SEG * SEGMENTS


def _saved_bytes(model, segments: int) -> int:
    ids = torch.randint(4, VOCAB, (BATCH, SEG * segments), generator=torch.Generator().manual_seed(2))
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
    loss.backward()  # the graph is still usable
    return total


@pytest.mark.parametrize("recall", [True, False])
def test_gradient_checkpointing_stores_little_per_extra_segment(recall: bool) -> None:
    plain = _hmt(use_recall=recall)
    plain.train()
    per_segment_plain = (_saved_bytes(plain, 6) - _saved_bytes(plain, 2)) / 4

    ckpt = _hmt(use_recall=recall)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    per_segment_ckpt = (_saved_bytes(ckpt, 6) - _saved_bytes(ckpt, 2)) / 4

    assert per_segment_plain > 0
    assert per_segment_ckpt < 0.1 * per_segment_plain, (per_segment_ckpt, per_segment_plain)


def test_checkpointing_saves_no_stacked_copy_of_the_memory_cache() -> None:
    """Regression: each segment's recall stacked the cache, (B, N, h) keys and (B, N, d) values, and autograd
    saved that copy for backward: O(segments x recall_window) memory even with gradient checkpointing. With
    checkpointing the recall is recomputed in backward, so no saved tensor spans several cache entries."""
    recall_dim = 24  # differs from every other width of the tiny model
    base = hmt_testing.tiny_causal_lm("llama")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = HMTConfig(task_type="CAUSAL_LM", segment_length=8, num_sensory=2, recall_dim=recall_dim, recall_window=8)
    model = peft.get_peft_model(base, config).train()
    ids = torch.randint(4, 128, (BATCH, 6 * 8))
    stacked = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        # stacked keys (B, N, h), saved by the scores matmul in either layout: (B, N, h) or (B, h, N)
        if t.dim() == 3 and t.shape[0] == BATCH and recall_dim in t.shape[1:] and min(t.shape[1:]) >= 2:
            stacked.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, fused_lm_head=True).loss
    assert stacked == []
    loss.backward()  # and the recomputed recall still gives gradients to the recall projections
    grads = [p.grad for n, p in model.named_parameters() if "hmt_recall" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
