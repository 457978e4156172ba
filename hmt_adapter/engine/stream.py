"""The stream state: HMT fed token by token, what streaming, `generate` and ragged batches all run on.

One state, three public operations, for B rows that advance in lock-step:

    state = open_stream(runner, batch_size, device)     # segment 0, reading m_0
    hidden = feed(runner, state, ids)                   # (B, c) ids, any c; hidden states of the released tokens
    hidden = finish(runner, state)                      # fix the open segment's query, release what was held back

A segment that arrives whole goes through `run_segment`, exactly as in the forward (read, `segment_step`, write).
A segment that arrives in pieces runs the same `SegmentLayout` on the backbone's KV cache: ``prefix`` (memory,
sensory and the tokens known), then each new token at its ``token_position``, then the ``write_slot`` once the
segment is full (`close_segment`: the memory write and sensory carry of `HMTRunner.advance`). The memory a segment
reads is fixed by `read_memory` as soon as its recall query is known (`query_known`); its tokens are the rule's
(`HMTRunner.recall_queries`, the one place a query's window is cut). `hmt_adapter.engine.ragged` drives
`close_segment` / `read_memory` for groups of rows at different positions on one shared KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch

from .layout import SegmentLayout, query_known
from .memory import MemoryCache
from .runner import HMTRunner, MemoryState
from .settings import EngineSettings
from .step import HeadRequest, run_segment

#: which hidden states `feed` / `finish` return: every released token's, the last one's, or none
Released = Literal["all", "last", "none"]


def config_header(config: EngineSettings) -> dict[str, Any]:
    """The config fields a stream state records and checks (`HMTConfig.stream_state_fields`)."""
    return {name: getattr(config, name) for name in config.stream_state_fields()}


@dataclass
class HMTStreamState:
    """Everything HMT carries between chunks of a stream, for B rows that advance in lock-step.

    Attributes:
        carry: the `MemoryState` entering the open segment n (sensory, last memory, long-term cache).
        pending: (B, t) int64 token ids of segment n received so far, 0 <= t < segment_length.
        memory: (B, d) memory embedding m_n read by segment n, in the adapter's dtype; None while its recall query
            is not known yet (``recall_query="segment"`` before ``summary_length`` tokens of segment n arrived).
        tokens_seen: tokens fed so far (all segments).
        config: the adapter config fields the state depends on (`config_header`), checked on use and load.
        kv: the backbone's KV cache over ``[m_n ; sensory ; pending[:, :released]]`` (derived: not saved, rebuilt
            from ``pending`` when needed).
        released: pending tokens whose outputs were returned (all of them are in ``kv`` when ``kv`` is set);
            tokens in ``pending`` beyond it are held back.
    """

    carry: MemoryState
    pending: torch.Tensor
    memory: Optional[torch.Tensor]
    tokens_seen: int = 0
    config: dict = field(default_factory=dict)
    kv: Any = field(default=None, repr=False)
    released: int = 0

    @property
    def segment(self) -> int:
        """Index n of the open segment (0-based)."""
        return self.carry.segment

    @property
    def cache(self) -> MemoryCache:
        """The long-term memory (the last ``recall_window`` memory embeddings)."""
        return self.carry.cache

    @property
    def batch_size(self) -> int:
        return self.pending.shape[0]

    @property
    def position_in_segment(self) -> int:
        """Tokens of the open segment received so far (t)."""
        return self.pending.shape[1]

    @property
    def layout(self) -> SegmentLayout:
        """The open segment's token layout."""
        return SegmentLayout.of(self.carry.sensory)

    @property
    def held_back(self) -> int:
        """Tokens fed whose outputs have not been returned yet."""
        return self.pending.shape[1] - self.released if self.memory is not None else self.pending.shape[1]

    def select(self, index: torch.Tensor) -> None:
        """Keep the rows ``index`` (R,) of the stream, in that order, in place (beam search reorders beams so)."""
        carry, cache = self.carry, self.carry.cache
        cache.values = [v[index] for v in cache.values]
        cache.keys = [None if k is None else k[index] for k in cache.keys]
        last = None if carry.last_memory is None else carry.last_memory[index]
        self.carry = MemoryState(carry.segment, carry.sensory[index], last, cache)
        self.pending = self.pending[index]
        self.memory = None if self.memory is None else self.memory[index]
        if self.kv is not None:
            self.kv.reorder_cache(index)


# ---- the public operations ----------------------------------------------------------------------------------
def open_stream(runner: HMTRunner, batch_size: int, device: torch.device) -> HMTStreamState:
    """An empty stream: segment 0, reading the learned initial memory m_0."""
    like = torch.empty(0, dtype=runner.bb.embed_dtype, device=device)
    pending = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
    state = HMTStreamState(carry=runner.start(batch_size, like), pending=pending, memory=None,
                           config=config_header(runner.config))
    read_memory(runner, state)
    return state


def feed(runner: HMTRunner, state: HMTStreamState, ids: torch.Tensor, hidden: Released = "all") -> list[torch.Tensor]:
    """Advance ``state`` (in place) by the (B, c) token ids ``ids``.

    Returns the last-layer hidden states of the tokens released by this call, as a list of (B, r_i, d) pieces in
    order (``hidden="all"``); only the piece ending at the last released token (``"last"``), or nothing (``"none"``).
    """
    seg_len = runner.config.segment_length
    out: list[torch.Tensor] = []
    pos, total = 0, ids.shape[1]
    queries = _whole_segment_queries(runner, state, ids)  # a long prompt: all its queries in one pass
    while pos < total:
        t = state.pending.shape[1]
        take = min(seg_len - t, total - pos)
        new = ids[:, pos : pos + take]
        pos += take
        state.tokens_seen += take
        if t == 0 and take == seg_len and state.kv is None:  # a whole segment: `run_segment`, as in the forward
            piece = _whole_segment(runner, state, new, queries.get(state.segment))
            _open_next(runner, state, new, queries.get(state.segment))
        else:
            state.pending = torch.cat([state.pending, new], dim=1)
            if state.memory is None and query_known(runner.config, state.pending.shape[1]):
                read_memory(runner, state, window=state.pending)
            piece = None
            if state.memory is not None:
                piece = _run_pending(runner, state)
                if state.pending.shape[1] == seg_len:
                    ended = state.pending
                    close_segment(runner, state, ended, _write_slot(runner, state))
                    _open_next(runner, state, ended)
        _collect(out, piece, hidden)
    return out


def finish(runner: HMTRunner, state: HMTStreamState, hidden: Released = "all") -> list[torch.Tensor]:
    """End of input: fix the open segment's query with the tokens known now (``[s ; s]`` if none) and release the
    held-back tokens. Feeding after `finish` goes on with that memory (what generation does)."""
    if state.memory is None:
        read_memory(runner, state, window=state.pending)
    if state.kv is None and state.pending.shape[1] == 0:
        return []
    out: list[torch.Tensor] = []
    _collect(out, _run_pending(runner, state), hidden)
    return out


def read_memory(runner: HMTRunner, state: HMTStreamState, query: Optional[torch.Tensor] = None,
                window: Optional[torch.Tensor] = None) -> None:
    """Fix m_n, the memory the open segment reads: with its recall query (B, d) ``query``, or the query of
    ``window`` (B, t) token ids laid out from the open segment's first column (the rule picks the query's tokens
    among them), or, with neither, from no tokens (``[s ; s]``)."""
    if query is None:
        query = _query_at(runner, state, window if window is not None else state.pending[:, :0], 0)
    state.memory = runner.read(state.carry, query)


def close_segment(runner: HMTRunner, state: HMTStreamState, x_ids: torch.Tensor, e_raw: torch.Tensor) -> None:
    """The open segment n is complete (``x_ids``: its (B, L) tokens; ``e_raw``: the write slot's hidden state
    (B, d)): write its memory, carry the sensory tokens, and open segment n + 1 with no memory read yet."""
    state.carry = runner.advance(state.carry, x_ids, e_raw)
    state.pending = x_ids[:, :0]
    state.kv, state.released, state.memory = None, 0, None


# ---- inside a segment ------------------------------------------------------------------------------------------
def _whole_segment(runner: HMTRunner, state: HMTStreamState, ids: torch.Tensor,
                   query: Optional[torch.Tensor]) -> torch.Tensor:
    """Run a segment that arrives whole through `run_segment` and advance the state: its hidden states (B, L, d)."""
    if state.memory is None and query is None:
        query = _query_at(runner, state, ids, 0)
    x = runner.bb.embed(ids)
    x_len = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
    result, state.carry = run_segment(runner, state.carry, query, x, x_len, HeadRequest(hidden=True), memory=state.memory)
    state.pending = ids[:, :0]
    state.kv, state.released, state.memory = None, 0, None
    return result.hidden


def _open_next(runner: HMTRunner, state: HMTStreamState, ended: torch.Tensor,
               query: Optional[torch.Tensor] = None) -> None:
    """After segment n closed on the (B, L) tokens ``ended``: read segment n + 1's memory now if its query is
    already known (its window lies in ``ended``, or there is no recall)."""
    if query_known(runner.config, 0):
        if query is None:
            query = _query_at(runner, state, ended, ended.shape[1])
        read_memory(runner, state, query=query)


def _run_pending(runner: HMTRunner, state: HMTStreamState) -> torch.Tensor:
    """Run the pending tokens not yet in the KV cache (memory must be fixed): their hidden states (B, r, d)."""
    hidden, state.kv = runner.extend_tokens(state.memory, state.carry.sensory, state.pending, state.released, state.kv)
    state.released = state.pending.shape[1]
    return hidden


def _write_slot(runner: HMTRunner, state: HMTStreamState) -> torch.Tensor:
    """Run the write slot of the full open segment on its KV cache: e_raw (B, d)."""
    return runner.extend_write_slot(state.memory, state.carry.sensory, state.pending.shape[1], state.kv)


def _collect(out: list[torch.Tensor], piece: Optional[torch.Tensor], hidden: Released) -> None:
    if piece is None or piece.shape[1] == 0 or hidden == "none":
        return
    if hidden == "last":
        out[:] = [piece[:, -1:]]
    else:
        out.append(piece)


# ---- recall queries --------------------------------------------------------------------------------------------
def _query_at(runner: HMTRunner, state: HMTStreamState, tokens: torch.Tensor, segment_start: int) -> Optional[torch.Tensor]:
    """The recall query (B, d) of the segment starting at column ``segment_start`` of ``tokens`` (B, T), every column
    of which is known; None when the open segment recalls nothing (no recall, or nothing cached yet)."""
    if not runner.config.use_recall or len(state.cache) == 0:
        return None
    b, device = tokens.shape[0], tokens.device
    starts = torch.full((b,), segment_start, dtype=torch.long, device=device)
    ends = torch.full((b,), tokens.shape[1], dtype=torch.long, device=device)
    return runner.recall_queries(tokens, starts, ends)


def _whole_segment_queries(runner: HMTRunner, state: HMTStreamState, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """When ``ids`` starts at a segment border and holds m >= 2 whole segments, the recall queries those segments
    (and the one after them) will need, from ONE batched summary pass as in the forward: {segment index: (B, d)}."""
    cfg = runner.config
    seg = cfg.segment_length
    m = ids.shape[1] // seg
    if not cfg.use_recall or m < 2 or state.pending.shape[1] or state.kv is not None:
        return {}
    # segment j (relative) starts at column j * seg of ids; only windows that lie wholly inside ids are known here
    wanted = range(0 if state.memory is None else 1, m + (cfg.recall_query == "previous"))
    previous = cfg.summary_length if cfg.recall_query == "previous" else 0
    known = [j for j in wanted if j * seg - previous >= 0 and j * seg - previous + cfg.summary_length <= ids.shape[1]]
    if len(known) < 2:
        return {}
    b, device = ids.shape[0], ids.device
    rows = torch.arange(b, device=device).repeat(len(known))  # (W * B,): window-major
    starts = torch.tensor(known, device=device).repeat_interleave(b) * seg
    ends = torch.full_like(starts, ids.shape[1])
    queries = runner.recall_queries(ids, starts, ends, rows).view(len(known), b, -1)
    return {state.segment + j: queries[i] for i, j in enumerate(known)}
