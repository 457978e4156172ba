"""Memory operations of HMT: projection of memory embeddings, the long-term cache, and recall.

Everything here runs in the adapter's parameter dtype (float32 by default), whatever the backbone's
activation dtype: callers cast backbone outputs in and cast the results back to the embedding dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F


@dataclass
class HMTParams:
    """The parameters of one HMT adapter for the duration of a call (`hmt_adapter.tuner.layer.HMTLayer.params`
    resolves them from the layer that holds them)."""

    memory_init: torch.Tensor  # (d,)
    summary_token: Optional[torch.Tensor]  # (d,)
    write_token: Optional[torch.Tensor]  # (d,) the learned write token w (write_token="learned"), else None
    w_q: Optional[torch.Tensor]  # (h, d)
    w_k: Optional[torch.Tensor]  # (h, d)
    memory_proj: Optional[torch.Tensor]  # (d, d)
    memory_gate: Optional[torch.Tensor]  # () gate g on the recalled memory (memory_gate=True), else None
    embed_norm: torch.Tensor  # () typical norm of an input-embedding row
    recall_null: Optional[torch.Tensor] = None  # (d,) the null slot's key source n (recall_null=True), else None
    recall_log_n: bool = False  # recall_scale="log_n": recall scores also scaled by ln N (N memories recalled over)
    recall_sharpen_beyond: int = 0  # K > 1: scores also scaled by max(1, ln N / ln K) (recall_sharpen_beyond)

    @property
    def dtype(self) -> torch.dtype:
        return self.memory_init.dtype


def to_memory_space(hidden: torch.Tensor, params: HMTParams) -> torch.Tensor:
    """Map last-layer hidden states (..., d) to memory embeddings in the input-embedding space (docs/design.md, section 1.4).

    With a memory projection: rescale each vector to the embeddings' typical norm, then apply the learned
    d x d map (identity at init). Without one: the hidden state as it is.
    """
    hidden = hidden.to(params.dtype)
    if params.memory_proj is None:
        return hidden
    scale = params.embed_norm.to(hidden.dtype) / hidden.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return F.linear(hidden * scale, params.memory_proj)


def query_space(hidden: torch.Tensor, params: HMTParams) -> torch.Tensor:
    """Summary-pass hidden state (..., d) -> recall query input, on the same scale as the memories."""
    hidden = hidden.to(params.dtype)
    if params.memory_proj is None:
        return hidden
    return hidden * (params.embed_norm.to(hidden.dtype) / hidden.norm(dim=-1, keepdim=True).clamp_min(1e-6))


@dataclass
class MemoryCache:
    """Long-term memory: the last ``recall_window`` memory embeddings and their recall keys.

    values: list of (B, d) memory embeddings, oldest first; keys: list of (B, h) = W_k values (or None
    without recall); segment: the 0-based segment index that wrote each entry.
    """

    window: int
    values: list[torch.Tensor] = field(default_factory=list)
    keys: list[Optional[torch.Tensor]] = field(default_factory=list)
    segment: list[int] = field(default_factory=list)

    def append(self, value: torch.Tensor, key: Optional[torch.Tensor], segment: int) -> None:
        self.values.append(value)
        self.keys.append(key)
        self.segment.append(segment)
        if len(self.values) > self.window:
            del self.values[0], self.keys[0], self.segment[0]

    def __len__(self) -> int:
        return len(self.values)

    def detached_before(self, first_attached_segment: int) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
        """Values and keys, with entries written before ``first_attached_segment`` cut from the graph."""
        values, keys = [], []
        for v, k, s in zip(self.values, self.keys, self.segment):
            cut = s < first_attached_segment
            values.append(v.detach() if cut else v)
            keys.append(None if k is None else (k.detach() if cut else k))
        return values, keys


def recall_key(memory: torch.Tensor, params: HMTParams) -> Optional[torch.Tensor]:
    """Recall key W_k e for a memory embedding (B, d) -> (B, h); None when recall is off."""
    return None if params.w_k is None else F.linear(memory, params.w_k)


def recall(
    query: torch.Tensor, values: torch.Tensor, keys: torch.Tensor, params: HMTParams
) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory recall: ``softmax((W_q q)(W_k M)^T / sqrt(h)) M`` (with ``recall_log_n`` the scores are also scaled by
    ``ln N``; with ``recall_sharpen_beyond`` K, by ``max(1, ln N / ln K)``), gated to ``m_0 + tanh(g) (. - m_0)`` with a memory gate.

    With a null slot (``recall_null``) the softmax also runs over one more entry, keyed ``W_k n`` (a learned vector
    n) and valued ``m_0``: the weight recall puts there reads what segment 0 reads, so a query that matches no
    memory better than the null key reads (mostly) m_0 instead of the best of the distractors. ``ln N`` then counts
    the null slot.

    Pure (no observers are called here, so the segment step compiles whole; callers pass the weights to
    `notify_recall`).

    Args:
        query: (B, d) summary-pass hidden states in query space.
        values: (B, N, d) the cached memory embeddings M (oldest first).
        keys: (B, N, h) W_k M.

    Returns:
        memory (B, d) and the attention weights over the N memories (B, N); with a null slot they sum to one minus
        the null slot's weight.
    """
    q = F.linear(query.to(params.dtype), params.w_q)  # (B, h)
    scores = torch.einsum("bh,bnh->bn", q, keys)
    if params.recall_null is not None:
        null_key = F.linear(params.recall_null.to(q.dtype), params.w_k)  # (h,)
        scores = torch.cat([(q @ null_key).unsqueeze(-1), scores], dim=-1)  # the null slot first
    scores = scores / math.sqrt(q.shape[-1])
    if params.recall_log_n or params.recall_sharpen_beyond > 1:
        # ln N from the tensor itself: no Python number of memories for torch.compile to guard on
        log_n = torch.ones_like(scores).sum(-1, keepdim=True).log()
        if params.recall_sharpen_beyond > 1:  # relative to the K memories training recalled over, never below 1
            log_n = (log_n / math.log(params.recall_sharpen_beyond)).clamp_min(1.0)
        scores = scores * log_n
    weights = scores.softmax(dim=-1)
    if params.recall_null is not None:
        null_weight, weights = weights[:, :1], weights[:, 1:]
    memory = torch.einsum("bn,bnd->bd", weights, values)
    if params.recall_null is not None:
        memory = memory + null_weight * params.memory_init.to(memory.dtype)
    if params.memory_gate is not None:
        m0 = params.memory_init.to(memory.dtype)
        memory = m0 + torch.tanh(params.memory_gate.to(memory.dtype)) * (memory - m0)
    return memory, weights


def read_memory(
    memory: Optional[torch.Tensor], query: Optional[torch.Tensor], values: Optional[torch.Tensor],
    keys: Optional[torch.Tensor], params: HMTParams,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The memory m_n a segment reads: ``memory`` (B, d) as it is (m_0, or e_{n-1} without recall) when ``values``
    is None, else `recall` of ``query`` (B, d) over ``values`` (B, N, d) and ``keys`` (B, N, h). Returns m_n and
    the recall weights (B, N) (None when nothing was recalled). The one way memory is read: the segment step and
    the stream both call it."""
    if values is None:
        return memory, None
    return recall(query, values, keys, params)


def notify_recall(weights: Optional[torch.Tensor]) -> None:
    """Hand the (B, N) recall weights of one recall to the observers registered with `observe_recall`."""
    if weights is None:
        return
    for observer in _RECALL_OBSERVERS.get():
        observer(weights.detach())


_RECALL_OBSERVERS: contextvars.ContextVar[tuple] = contextvars.ContextVar("hmt_recall_observers", default=())


@contextlib.contextmanager
def observe_recall(observer: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """Call ``observer(weights)`` with the detached (B, N) recall weights of every recall made inside the block.

    N entries are oldest first and, since every segment writes one memory, entry i of N was written ``N - i``
    segments before the one reading (used by `hmt_adapter.evaluation` for the recall-distance histogram).
    """
    token = _RECALL_OBSERVERS.set(_RECALL_OBSERVERS.get() + (observer,))
    try:
        yield
    finally:
        _RECALL_OBSERVERS.reset(token)
