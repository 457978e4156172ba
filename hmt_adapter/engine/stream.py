"""The segment step, token by token: what streaming (`hmt_adapter.inference.streaming`) and `generate` run.

A segment that arrives whole runs as one `HMTRunner.segment_pass`, exactly as in the forward. A segment that
arrives in pieces runs the same `SegmentLayout` with the backbone's KV cache: ``prefix`` (memory, sensory and
the tokens known), then each new token at its ``token_position``, then the ``write_slot`` at the
``write_position`` once the segment is full; `HMTRunner.advance` then carries the state into the next segment.
The memory a segment reads is fixed as soon as its recall query is known (`query_known`, `summary_window_start`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional


import torch

from .memory import MemoryCache
from .layout import SegmentLayout, query_known, summary_window_start
from .runner import HMTRunner, MemoryState

if TYPE_CHECKING:  # the engine reads a config's fields; it never imports the tuner
    from ..tuner.config import HMTConfig

def config_header(config: "HMTConfig") -> dict[str, Any]:
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
        config: the adapter config fields the state depends on (`STATE_CONFIG_FIELDS`), checked on use and load.
        kv: the backbone's KV cache over ``[m_n ; sensory ; pending[:, :kv_tokens]]`` (derived: not saved, rebuilt
            from ``pending`` when needed).
        kv_tokens: pending tokens whose outputs were returned (all of them are in ``kv`` when ``kv`` is set);
            tokens in ``pending`` beyond it are held back.
    """

    carry: MemoryState
    pending: torch.Tensor
    memory: Optional[torch.Tensor]
    tokens_seen: int = 0
    config: dict = field(default_factory=dict)
    kv: Any = field(default=None, repr=False)
    kv_tokens: int = 0

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
    def held_back(self) -> int:
        """Tokens fed whose outputs have not been returned yet."""
        return self.pending.shape[1] - self.kv_tokens if self.memory is not None else self.pending.shape[1]


def new_state(runner: HMTRunner, batch_size: int, device: torch.device) -> HMTStreamState:
    """An empty stream: segment 0, reading the learned initial memory m_0."""
    like = torch.empty(0, dtype=runner.bb.embed_dtype, device=device)
    carry = runner.start(batch_size, like)
    memory, _ = runner.read(carry, None)
    pending = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
    return HMTStreamState(carry=carry, pending=pending, memory=memory, config=config_header(runner.config))


def _queries(runner: HMTRunner, windows: torch.Tensor) -> torch.Tensor:
    """Recall queries of W full windows (W, B, t) token ids in ONE summary pass: (W, B, d)."""
    w, b, t = windows.shape
    lengths = torch.full((w * b,), t, dtype=torch.long, device=windows.device)
    return runner.summary_queries(runner.bb.embed(windows.reshape(w * b, t)), lengths).view(w, b, -1)


def _fix_memory(runner: HMTRunner, state: HMTStreamState, window: torch.Tensor,
                query: Optional[torch.Tensor] = None) -> None:
    """Read m_n for the open segment with the recall query of the (B, t) token ids ``window`` (t may be 0), or
    with ``query`` (B, d) when it was computed beforehand from that window."""
    if query is None and runner.config.use_recall and len(state.cache) > 0:
        query = _queries(runner, window.unsqueeze(0))[0]
    state.memory, _ = runner.read(state.carry, query)


def _whole_segment_queries(runner: HMTRunner, state: HMTStreamState, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """When ``ids`` starts at a segment border and holds m >= 2 whole segments, the recall queries those segments
    (and the one after them) will need, from ONE batched summary pass as in the forward: {segment index: (B, d)}."""
    cfg = runner.config
    seg = cfg.segment_length
    m = ids.shape[1] // seg
    if not cfg.use_recall or m < 2 or state.pending.shape[1] or state.kv is not None:
        return {}
    # segment j (relative) starts at column j * seg of ids; its window is the rule's, inside ids
    wanted = range(0 if state.memory is None else 1, m + (cfg.recall_query == "previous"))
    starts = [summary_window_start(cfg, j * seg) for j in wanted]
    keep = [(j, a) for j, a in zip(wanted, starts) if a >= 0 and a + cfg.summary_length <= ids.shape[1]]
    if len(keep) < 2:
        return {}
    windows = torch.stack([ids[:, a : a + cfg.summary_length] for _, a in keep])  # (W, B, t)
    queries = _queries(runner, windows)
    return {state.segment + j: queries[i] for i, (j, _) in enumerate(keep)}


def _window(config: HMTConfig, tokens: torch.Tensor, segment_start: int) -> torch.Tensor:
    """Segment n's summary window cut from ``tokens`` (B, T), where segment n starts at column ``segment_start``."""
    start = summary_window_start(config, segment_start)
    return tokens[:, start : start + config.summary_length]


def _close(runner: HMTRunner, state: HMTStreamState, x_ids: torch.Tensor, e_raw: torch.Tensor,
           queries: Optional[dict[int, torch.Tensor]] = None) -> None:
    """Segment n is complete (x_ids: its (B, L) tokens): advance the memory state and open segment n + 1."""
    state.carry = runner.advance(state.carry, runner.bb.embed(x_ids), e_raw)
    state.pending = x_ids[:, :0]
    state.kv, state.kv_tokens, state.memory = None, 0, None
    if query_known(runner.config, 0):  # the window lies before the new segment: in x_ids
        query = (queries or {}).get(state.segment)
        _fix_memory(runner, state, _window(runner.config, x_ids, x_ids.shape[1]), query)


def _run_pending(runner: HMTRunner, state: HMTStreamState) -> torch.Tensor:
    """Run the pending tokens not yet in the KV cache (memory must be fixed): their hidden states (B, r, d)."""
    layout = SegmentLayout.of(state.carry.sensory)
    start = state.kv_tokens
    if state.kv is None:  # a new segment, or a loaded state (whose first `start` tokens were returned before)
        embeds = layout.prefix(state.memory, state.carry.sensory, runner.bb.embed(state.pending))
        hidden, state.kv = runner.extend(embeds, None, 0)
        state.kv_tokens = state.pending.shape[1]
        return hidden[:, layout.token_position(start) :]
    new = runner.bb.embed(state.pending[:, start:])
    hidden = new
    if new.shape[1]:
        hidden, state.kv = runner.extend(new, state.kv, layout.token_position(start))
    state.kv_tokens = state.pending.shape[1]
    return hidden


def _write(runner: HMTRunner, state: HMTStreamState) -> torch.Tensor:
    """Run the write slot of the full open segment on its KV cache: e_raw (B, d)."""
    layout = SegmentLayout.of(state.carry.sensory)
    slot = layout.write_slot(runner.write_input(state.memory), state.carry.sensory)
    hidden, _ = runner.extend(slot, state.kv, layout.write_position(state.pending.shape[1]))
    return hidden[:, 0]


def _keep(hidden: torch.Tensor, keep: str) -> Optional[torch.Tensor]:
    if keep == "all" or hidden.shape[1] == 0:
        return hidden
    return hidden[:, -1:] if keep == "last" else None


def feed_tokens(runner: HMTRunner, state: HMTStreamState, ids: torch.Tensor, keep: str = "all") -> list[torch.Tensor]:
    """Advance ``state`` (in place) by the (B, c) token ids ``ids``.

    Returns the last-layer hidden states of the tokens released by this call, as a list of (B, r_i, d) pieces in
    order (``keep="all"``); only the piece ending at the last released token (``"last"``), or nothing (``"none"``).
    """
    cfg = runner.config
    seg_len = cfg.segment_length
    out: list[torch.Tensor] = []
    pos, total = 0, ids.shape[1]
    queries = _whole_segment_queries(runner, state, ids)  # a long prompt: all its queries in one pass
    while pos < total:
        t = state.pending.shape[1]
        take = min(seg_len - t, total - pos)
        new = ids[:, pos : pos + take]
        pos += take
        state.tokens_seen += take
        if t == 0 and take == seg_len and state.kv is None:  # a whole segment: one segment_pass, as in forward
            if state.memory is None:
                _fix_memory(runner, state, _window(cfg, new, 0), queries.get(state.segment))
            x = runner.bb.embed(new)
            x_len = torch.full((x.shape[0],), seg_len, dtype=torch.long, device=x.device)
            hidden, e_raw = runner.segment_pass(state.memory, state.carry.sensory, x, x_len)
            piece = _keep(hidden, keep)
            _close(runner, state, new, e_raw, queries)
        else:
            state.pending = torch.cat([state.pending, new], dim=1)
            if state.memory is None and query_known(cfg, state.pending.shape[1]):
                _fix_memory(runner, state, _window(cfg, state.pending, 0))
            piece = None
            if state.memory is not None:
                piece = _keep(_run_pending(runner, state), keep)
                if state.pending.shape[1] == seg_len:
                    _close(runner, state, state.pending, _write(runner, state))
        if piece is not None and piece.shape[1]:
            if keep == "last":
                out[:] = [piece]
            else:
                out.append(piece)
    return out


def flush(runner: HMTRunner, state: HMTStreamState, keep: str = "all") -> list[torch.Tensor]:
    """Fix the open segment's query with the tokens known now (``[s ; s]`` if none) and release held tokens."""
    if state.memory is None:
        _fix_memory(runner, state, _window(runner.config, state.pending, 0))
    if state.kv is None and state.pending.shape[1] == 0:
        return []
    piece = _keep(_run_pending(runner, state), keep)
    return [] if piece is None or piece.shape[1] == 0 else [piece]


def select_rows(state: HMTStreamState, index: torch.Tensor) -> None:
    """Keep the rows ``index`` (R,) of a stream, in that order, in place (beam search reorders beams this way)."""
    carry = state.carry
    cache = carry.cache
    cache.values = [v[index] for v in cache.values]
    cache.keys = [None if k is None else k[index] for k in cache.keys]
    last = None if carry.last_memory is None else carry.last_memory[index]
    state.carry = MemoryState(carry.segment, carry.sensory[index], last, cache)
    state.pending = state.pending[index]
    state.memory = None if state.memory is None else state.memory[index]
    if state.kv is not None:
        state.kv.reorder_cache(index)
