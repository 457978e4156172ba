"""The HMT segment step: memory read (recall), segment pass, memory write, sensory carry.

`HMTRunner` is built per call from a backbone, the adapter's parameters and its config; it holds no state
between calls. What HMT carries from one segment to the next is an explicit `MemoryState`, taken and returned:

    state = runner.start(batch_size, like=embeds)                   # segment 0 reads m_0
    queries = runner.recall_queries(tokens, starts, ends)           # one batched summary pass for all segments
    memory, weights = runner.memory_source(state, query_n).read(runner.params)    # m_n
    hidden_x, e_raw = runner.segment_pass(memory, state.sensory, x, x_len)
    state = runner.advance(state, x, e_raw)                         # e_n cached, sensory carried, n + 1

The whole-batch forward (`hmt_adapter.engine.forward`) and the stream (`hmt_adapter.engine.stream`) drive these
methods, both through `hmt_adapter.engine.step.run_segment` for a whole segment; the token layout of a pass is
`SegmentLayout`'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .backbone import Backbone
from .layout import SegmentLayout, frame, read_after, summary_window_start
from .memory import HMTParams, MemoryCache, notify_recall, query_space, read_memory, recall_key, to_memory_space
from .settings import EngineSettings


@dataclass
class MemoryState:
    """What HMT carries into segment ``segment`` for B rows.

    Attributes:
        segment: index n of the next segment (0-based).
        sensory: (B, k, d) embeddings of the last k <= num_sensory tokens before segment n.
        last_memory: (B, d) memory embedding e_{n-1} of the previous segment (None for n == 0).
        cache: the long-term memory, the last ``recall_window`` memory embeddings and their recall keys. It is an
            append-only window that successive states share (like a KV cache): `advance` appends to it.
    """

    segment: int
    sensory: torch.Tensor
    last_memory: Optional[torch.Tensor]
    cache: MemoryCache


@dataclass
class MemorySource:
    """What one segment reads: either ``memory`` (B, d) as it is, or recall over the cache with ``query`` (B, d)
    and the N cache entries ``values`` (N x (B, d)) and ``keys`` (N x (B, h)), oldest first."""

    memory: Optional[torch.Tensor] = None
    query: Optional[torch.Tensor] = None
    values: Optional[list[torch.Tensor]] = None
    keys: Optional[list[torch.Tensor]] = None

    def stacked(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The cache entries as (B, N, d) values and (B, N, h) keys (None, None without recall)."""
        if self.values is None:
            return None, None
        return torch.stack(self.values, dim=1), torch.stack(self.keys, dim=1)

    def read(self, params: HMTParams) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """m_n (B, d) and the recall weights (B, N) (None when the memory is read as it is): `read_memory`, the
        function the segment step uses too."""
        return read_memory(self.memory, self.query, *self.stacked(), params)


class HMTRunner:
    """Stateless driver of one HMT adapter on one backbone (see the module docstring)."""

    def __init__(self, backbone: Backbone, params: HMTParams, config: EngineSettings) -> None:
        self.bb = backbone
        self.params = params
        self.config = config

    # ---- state --------------------------------------------------------------------------------------------
    def start(self, batch_size: int, like: torch.Tensor) -> MemoryState:
        """The state before segment 0 (no sensory tokens, empty cache); ``like`` gives device and dtype."""
        d = self.bb.embeddings.weight.shape[1]
        sensory = torch.zeros(batch_size, 0, d, dtype=like.dtype, device=like.device)
        return MemoryState(segment=0, sensory=sensory, last_memory=None, cache=MemoryCache(window=self.config.recall_window))

    def advance(self, state: MemoryState, x: torch.Tensor, e_raw: torch.Tensor) -> MemoryState:
        """The state after segment ``state.segment``: its memory e_n written, sensory carried.

        Args:
            x: (B, L, d) the segment's token embeddings, or its (B, L) token ids (full segments; a short last segment
                is never continued).
            e_raw: (B, d) last-layer hidden state at the segment's write slot.
        """
        x = x if x.is_floating_point() else self.bb.embed(x)
        return self.write(state, x, *self.encode_memory(e_raw))

    def encode_memory(self, e_raw: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The write slot's hidden state (B, d) -> memory embedding e_n (B, d) and its recall key (B, h) (or None)."""
        e = to_memory_space(e_raw, self.params)
        return e, recall_key(e, self.params)

    def write(self, state: MemoryState, x: torch.Tensor, e: torch.Tensor, key: Optional[torch.Tensor]) -> MemoryState:
        """`advance` with the memory embedding e_n (B, d) and its recall key (B, h) (or None) already computed
        (`hmt_adapter.engine.step.segment_step` computes them inside the segment step)."""
        n = state.segment
        state.cache.append(e, key, n)
        return MemoryState(segment=n + 1, sensory=self._next_sensory(state.sensory, x, n), last_memory=e, cache=state.cache)

    def _next_sensory(self, sensory: torch.Tensor, x: torch.Tensor, segment: int) -> torch.Tensor:
        """The last ``num_sensory`` embeddings of ``[sensory ; x]``, cut from the graph at a BPTT block start."""
        k = self.config.num_sensory
        if k == 0:
            return x[:, :0]
        out = torch.cat([sensory, x], dim=1)[:, -k:]
        return out.detach() if self.block_start(segment + 1) == segment + 1 else out

    # ---- summary pass -------------------------------------------------------------------------------------
    def recall_queries(
        self, tokens: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, rows: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Recall queries of P segments in ONE summary pass: the one place a query's tokens are chosen.

        Segment p lies in row ``rows[p]`` of ``tokens`` and starts at column ``starts[p]``; its window is the rule's
        (`summary_window_start`: its own first ``summary_length`` tokens, or the ``summary_length`` before it),
        cut to the columns ``[0, ends[p])`` that are known (a short last segment, a stream that has not seen them).

        Args:
            tokens: (B, T) token ids or (B, T, d) token embeddings.
            starts, ends: (P,) int64 columns; rows: (P,) rows of ``tokens`` (None: P = B, segment p in row p).

        Returns:
            (P, d) recall queries.
        """
        if rows is None:
            rows = torch.arange(tokens.shape[0], device=tokens.device)
        width = self.config.summary_length
        first = torch.as_tensor(summary_window_start(self.config, starts), device=tokens.device)
        lengths = (torch.minimum(first + width, ends) - first.clamp(min=0)).clamp(min=0)  # (P,)
        first = first.clamp(min=0)
        cols = (first.unsqueeze(1) + torch.arange(width, device=tokens.device)).clamp(max=max(tokens.shape[1] - 1, 0))
        window = tokens[rows.unsqueeze(1), cols] if tokens.shape[1] else tokens.new_zeros(rows.shape[0], width, *tokens.shape[2:])
        embeds = window if window.is_floating_point() else self.bb.embed(window)  # (P, width, d); past a length: junk
        return self.summary_queries(embeds, lengths)

    def summary_queries(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Run ``[s ; tokens[:length] ; s]`` for P summary windows in ONE batched backbone pass.

        Args:
            tokens: (P, t, d) token embeddings, right-padded; t <= ``summary_length``.
            lengths: (P,) real lengths (0 allowed: the window is just ``[s ; s]``).

        Returns:
            (P, d) recall queries (last-layer hidden state at the final ``s``, in query space).
        """
        s = self.params.summary_token.to(tokens.dtype).expand(tokens.shape[0], -1)
        hidden = self.bb.run(frame(s, tokens, lengths, s)).last_hidden_state  # (P, t + 2, d)
        return query_space(read_after(hidden, lengths), self.params)

    # ---- memory read --------------------------------------------------------------------------------------
    def block_start(self, segment: int) -> int:
        """First segment whose memory still carries gradient into ``segment`` (truncated BPTT blocks)."""
        k = self.config.bptt_depth
        return 0 if k is None else (segment // k) * k

    def memory_source(self, state: MemoryState, query: Optional[torch.Tensor]) -> "MemorySource":
        """What segment ``state.segment`` reads, with the truncated-BPTT cuts made: the memory itself (m_0, or
        e_{n-1} without recall) or the recall inputs (query and the cache entries, as lists)."""
        n, batch_size = state.segment, state.sensory.shape[0]
        if n == 0 or len(state.cache) == 0:
            return MemorySource(memory=self.params.memory_init.unsqueeze(0).expand(batch_size, -1))
        first_attached = self.block_start(n)
        if not self.config.use_recall:
            last = state.last_memory
            return MemorySource(memory=last.detach() if n - 1 < first_attached else last)
        values, keys = state.cache.detached_before(first_attached)  # fresh lists: later appends don't reach a recompute
        return MemorySource(query=query, values=values, keys=keys)

    def read(self, state: MemoryState, query: Optional[torch.Tensor]) -> torch.Tensor:
        """m_n (B, d) for segment ``state.segment`` read outside a segment step (a stream fixing its memory before
        the segment's tokens run): `memory_source` and `read_memory`, exactly what `segment_step` does, with the
        recall observers notified."""
        memory, weights = self.memory_source(state, query).read(self.params)
        notify_recall(weights)
        return memory

    # ---- segment pass -------------------------------------------------------------------------------------
    def write_input(self, memory: torch.Tensor) -> torch.Tensor:
        """The (B, d) embedding at the write position: the memory m_n itself, or the learned write token."""
        if self.params.write_token is None:
            return memory
        return self.params.write_token.unsqueeze(0).expand(memory.shape[0], -1)

    def segment_pass(
        self, memory: torch.Tensor, sensory: torch.Tensor, x: torch.Tensor, x_len: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the backbone on ``[m ; sensory ; x[:x_len] ; w]`` (w: `write_input`).

        Args:
            memory: (B, d) memory embedding m_n; sensory: (B, k, d); x: (B, l, d) right-padded; x_len: (B,).

        Returns:
            hidden_x: (B, l, d) last-layer hidden states at the positions of x.
            e_raw: (B, d) last-layer hidden state at the write slot (before projection).
        """
        layout = SegmentLayout.of(sensory)
        hidden = self.bb.run(layout.pack(memory, sensory, x, x_len, self.write_input(memory))).last_hidden_state
        return layout.unpack(hidden, x_len, x.shape[1])

    def extend_tokens(
        self, memory: torch.Tensor, sensory: torch.Tensor, ids: torch.Tensor, start: int, past_key_values
    ) -> tuple[torch.Tensor, object]:
        """Run a segment's tokens ``ids[:, start:]`` (B, t) on its KV cache: the cached form of `segment_pass`.

        ``past_key_values`` None: a new cache, built from ``[m ; sensory ; ids]`` (`SegmentLayout.prefix`; the
        first ``start`` tokens were returned before); else the cache over ``[m ; sensory ; ids[:, :start]]``.
        Returns the hidden states of tokens ``start ..`` (B, t - start, d) and the cache.
        """
        layout = SegmentLayout.of(sensory)
        if past_key_values is None:
            hidden, kv = self.extend(layout.prefix(memory, sensory, self.bb.embed(ids)), None, 0)
            return hidden[:, layout.token_position(start) :], kv
        new = self.bb.embed(ids[:, start:])
        if not new.shape[1]:
            return new, past_key_values
        return self.extend(new, past_key_values, layout.token_position(start))

    def extend_write_slot(
        self, memory: torch.Tensor, sensory: torch.Tensor, length: int, past_key_values
    ) -> torch.Tensor:
        """Run the write slot after ``length`` tokens on a segment's KV cache: e_raw (B, d), the hidden state
        `segment_pass` returns for a whole segment."""
        layout = SegmentLayout.of(sensory)
        slot = layout.write_slot(self.write_input(memory), sensory)
        hidden, _ = self.extend(slot, past_key_values, layout.write_position(length))
        return hidden[:, 0]

    def extend(
        self, embeds: torch.Tensor, past_key_values, start: Union[int, torch.Tensor],
        attention_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, object]:
        """Run (B, c, d) ``embeds`` at segment positions ``start .. start + c - 1`` on top of a KV cache.

        ``past_key_values`` is None for a new segment (then ``start`` must be 0) or the cache returned by the
        previous call for the same segment. Returns the last-layer hidden states (B, c, d) and the updated cache.
        Running `SegmentLayout.prefix`, the remaining tokens and `SegmentLayout.write_slot` this way gives the same
        hidden states as one `segment_pass` (positions restart at 0 in every segment).
        ``start`` may be a (B,) tensor (rows at different positions, `hmt_adapter.engine.ragged`); then
        ``attention_mask`` (B, S + c), or a 4D mask in the backbone's attention format, hides the cache slots a row
        must not see.
        """
        b, c = embeds.shape[:2]
        offsets = torch.arange(c, device=embeds.device).unsqueeze(0)
        positions = (torch.as_tensor(start, device=embeds.device).reshape(-1, 1) + offsets).expand(b, -1)
        out = self.bb.run(embeds, past_key_values=past_key_values, use_cache=True, position_ids=positions,
                          attention_mask=attention_mask)
        return out.last_hidden_state, out.past_key_values
