"""The HMT recurrence: one segment step, the batched summary pass and memory recall.

`HMTRunner` is built per call from a backbone, the adapter's parameters and its config; it holds no state
between calls. Forward, generation and streaming all drive the same methods:

    queries = runner.summary_queries(tokens, lengths)           # one batched pass for all segments
    memory, _ = runner.read_memory(n, query_n, cache, last, batch_size)     # m_n
    hidden_x, e_raw = runner.segment_pass(memory, sensory, x, x_len)
    e = runner.write_memory(e_raw, cache, n)                    # appended to the long-term cache
    sensory = runner.next_sensory(sensory, x)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from .backbone import Backbone
from .config import HMTConfig
from .memory import HMTParams, MemoryCache, recall, recall_key, to_memory_space, query_space


def frame(first: torch.Tensor, body: torch.Tensor, body_len: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Lay out ``[first ; body[:body_len] ; last ; (junk)]`` per row.

    Args:
        first: (B, d) embedding at position 0.
        body: (B, l, d) embeddings, right-padded per row.
        body_len: (B,) real length of each row's body.
        last: (B, d) embedding written right after each row's real body, at position ``1 + body_len``.

    Returns:
        (B, l + 2, d). Positions after ``1 + body_len`` hold padding that no earlier position attends to.
    """
    b, l, d = body.shape
    tail = body.new_zeros(b, 1, d)
    out = torch.cat([first.unsqueeze(1), body, tail], dim=1)  # (B, l + 2, d)
    pos = torch.arange(l + 2, device=body.device)
    at_last = (pos.unsqueeze(0) == (body_len + 1).unsqueeze(1)).unsqueeze(-1)  # (B, l + 2, 1)
    return torch.where(at_last, last.unsqueeze(1), out)


class HMTRunner:
    """Stateless driver of one HMT adapter on one backbone (see the module docstring).

    ``checkpoint_recall``: recompute memory recall in backward instead of letting autograd save each
    segment's stacked copy of the cache (O(segments x recall_window) memory). Set by callers that
    checkpoint segments.
    """

    def __init__(self, backbone: Backbone, params: HMTParams, config: HMTConfig, checkpoint_recall: bool = False) -> None:
        self.bb = backbone
        self.params = params
        self.config = config
        self.checkpoint_recall = checkpoint_recall

    # ---- summary pass -------------------------------------------------------------------------------------
    def summary_queries(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Run ``[s ; tokens[:length] ; s]`` for P summary windows in ONE batched backbone pass.

        Args:
            tokens: (P, t, d) token embeddings, right-padded; t <= ``summary_length``.
            lengths: (P,) real lengths (0 allowed: the window is just ``[s ; s]``).

        Returns:
            (P, d) recall queries (last-layer hidden state at the final ``s``, in query space).
        """
        s = self.params.summary_token.to(tokens.dtype).expand(tokens.shape[0], -1)
        embeds = frame(s, tokens, lengths, s)
        hidden = self.bb.run(embeds).last_hidden_state  # (P, t + 2, d)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return query_space(hidden[rows, lengths + 1], self.params)

    # ---- memory read --------------------------------------------------------------------------------------
    def initial_memory(self, batch_size: int) -> torch.Tensor:
        """m_0 for every row: (B, d) in the adapter's dtype."""
        return self.params.memory_init.unsqueeze(0).expand(batch_size, -1)

    def block_start(self, segment: int) -> int:
        """First segment whose memory still carries gradient into ``segment`` (truncated BPTT blocks)."""
        k = self.config.bptt_depth
        return 0 if k is None else (segment // k) * k

    def read_memory(
        self,
        segment: int,
        query: Optional[torch.Tensor],
        cache: MemoryCache,
        last_memory: Optional[torch.Tensor],
        batch_size: int,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The memory embedding m_n read by segment ``segment``.

        Args:
            segment: 0-based segment index n.
            query: (B, d) recall query of segment n (ignored without recall or for n == 0).
            cache: the long-term memory (entries of segments < n).
            last_memory: (B, d) memory embedding e_{n-1} written by the previous segment.
            batch_size: B.

        Returns:
            m_n (B, d) and the recall weights over the cache (B, N) (None when no recall happened).
        """
        if segment == 0 or len(cache) == 0:
            return self.initial_memory(batch_size), None
        first_attached = self.block_start(segment)
        if not self.config.use_recall:
            return (last_memory.detach() if segment - 1 < first_attached else last_memory), None
        values, keys = cache.detached_before(first_attached)  # fresh lists: later appends don't reach a recompute
        if self.checkpoint_recall and torch.is_grad_enabled():
            return checkpoint(recall, query, values, keys, self.params, use_reentrant=False)
        return recall(query, values, keys, self.params)

    # ---- segment pass -------------------------------------------------------------------------------------
    def segment_pass(
        self, memory: torch.Tensor, sensory: torch.Tensor, x: torch.Tensor, x_len: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the backbone on ``[m ; sensory ; x[:x_len] ; m]``.

        Args:
            memory: (B, d) memory embedding m_n (any float dtype).
            sensory: (B, k, d) sensory embeddings (k may be 0), in the embedding dtype.
            x: (B, l, d) segment token embeddings, right-padded per row.
            x_len: (B,) real tokens per row (<= l).

        Returns:
            hidden_x: (B, l, d) last-layer hidden states at the positions of x.
            e_raw: (B, d) last-layer hidden state at the write position (before projection).
        """
        k = sensory.shape[1]
        m = memory.to(x.dtype)
        embeds = frame(m, torch.cat([sensory, x], dim=1), x_len + k, m)
        hidden = self.bb.run(embeds).last_hidden_state  # (B, 1 + k + l + 1, d)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[:, 1 + k : 1 + k + x.shape[1]], hidden[rows, x_len + k + 1]

    # ---- the segment pass, incrementally (generation and streaming) -----------------------------------------
    def segment_prefix(self, memory: torch.Tensor, sensory: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The first positions of `segment_pass`'s layout, ``[m ; sensory ; x]``, for KV-cached decoding.

        Args:
            memory: (B, d) memory embedding m_n.
            sensory: (B, k, d) sensory embeddings.
            x: (B, t, d) the segment's first t tokens (no padding; t may be 0).

        Returns:
            (B, 1 + k + t, d) embeddings for positions 0 .. k + t. Feed the rest of the segment with `extend` at
            position ``1 + k + t``, and the write position ``[m]`` (`write_slot`) at ``1 + k + segment_length``.
        """
        return torch.cat([memory.to(x.dtype).unsqueeze(1), sensory, x], dim=1)

    @staticmethod
    def write_slot(memory: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The write-position embedding ``[m]`` of `segment_pass`'s layout: (B, 1, d) in ``like``'s dtype."""
        return memory.to(like.dtype).unsqueeze(1)

    def extend(self, embeds: torch.Tensor, past_key_values, start: int) -> tuple[torch.Tensor, object]:
        """Run (B, c, d) ``embeds`` at segment positions ``start .. start + c - 1`` on top of a KV cache.

        ``past_key_values`` is None for a new segment (then ``start`` must be 0) or the cache returned by the
        previous call for the same segment. Returns the last-layer hidden states (B, c, d) and the updated cache.
        Running ``segment_prefix`` and then the remaining tokens and ``write_slot`` this way gives the same hidden
        states as one `segment_pass` (positions restart at 0 in every segment).
        """
        b, c = embeds.shape[:2]
        positions = torch.arange(start, start + c, device=embeds.device).unsqueeze(0).expand(b, -1)
        out = self.bb.run(embeds, past_key_values=past_key_values, use_cache=True, position_ids=positions)
        return out.last_hidden_state, out.past_key_values

    # ---- memory write -------------------------------------------------------------------------------------
    def write_memory(self, e_raw: torch.Tensor, cache: MemoryCache, segment: int) -> torch.Tensor:
        """Project e_n into memory space, append it (with its recall key) to ``cache``, return it (B, d)."""
        e = to_memory_space(e_raw, self.params)
        cache.append(e, recall_key(e, self.params), segment)
        return e

    def next_sensory(self, sensory: torch.Tensor, x: torch.Tensor, segment: int) -> torch.Tensor:
        """Sensory memory for segment ``segment + 1``: the last ``num_sensory`` embeddings of ``[sensory ; x]``.

        ``x`` is segment ``segment``'s full (B, L, d) embeddings. At the start of a BPTT block the result is cut
        from the graph, like the memory.
        """
        k = self.config.num_sensory
        if k == 0:
            return x[:, :0]
        out = torch.cat([sensory, x], dim=1)[:, -k:]
        return out.detach() if self.block_start(segment + 1) == segment + 1 else out

    def new_cache(self) -> MemoryCache:
        return MemoryCache(window=self.config.recall_window)
