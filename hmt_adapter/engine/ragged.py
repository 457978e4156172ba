"""Rows at different places in their segments, decoded together: ONE backbone call per new token.

`generate` decodes batches whose prompts have different real lengths. Rows of equal length advance in lock-step,
as one `HMTStreamState` (a group); rows of different groups sit at different positions in their segments and roll
over to a new segment at different steps. `RaggedStreams` runs every group's token step in one backbone call on
ONE KV cache over all rows:

* a row's slots of its open segment, ``[m_n ; sensory ; tokens so far]``, lie in the shared cache, and ``valid``
  (R, S) marks them. A step appends one slot to every row, runs it at the row's own position
  (`SegmentLayout.token_position`), with an attention mask hiding every slot that is not the row's;
* when a group's segment fills, its rows and those of every other group filling at the same step close it
  together: the write slot on their cached slots (one call), the stream's `close_segment` (memory written, sensory
  carried), the new segments' recall queries from ONE summary pass for all of them (`HMTRunner.recall_queries`),
  the stream's `read_memory`, then the new segment's prefix ``[m ; sensory]`` (one call). Their slots are replaced and the cache is compacted (each row's slots moved to the
  left, unused columns dropped), so its width stays within about two segments.

One step is the stream's `feed` of one token followed by `finish` (the new segment's query is fixed with the
tokens known, as generation needs), computed with the same layout, positions, write slot and `close_segment`;
hidden states equal that to float tolerance (the prefix and a segment's first token now run as two cached calls).
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence

import torch

from .layout import SegmentLayout
from .runner import HMTRunner
from .stream import HMTStreamState, close_segment, read_memory


def _layers(kv: Any) -> list:
    return list(kv.layers)


def _set(layer: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Replace a cache layer's (B, h, S, hd) tensors (a sliding-window layer also counts its length)."""
    layer.keys, layer.values = keys, values
    if hasattr(layer, "cumulative_length"):
        layer.cumulative_length = keys.shape[-2]


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B, h, S, hd) -> (B, h, width, hd), zeros on the right (width >= S)."""
    extra = width - t.shape[2]
    return t if extra == 0 else torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], extra, t.shape[3])], dim=2)


#: attention implementations that take a ready 4D additive mask as it is (transformers then skips building one
#: from a 2D mask on every call, a measurable share of a small model's decoding step)
_ADDITIVE_4D = ("sdpa", "eager")


def _blocked(runner: HMTRunner, valid: torch.Tensor) -> Optional[torch.Tensor]:
    """The attention mask over a cache whose slots are ``valid`` (B, S): None when every slot is valid (a plainly
    causal call); else (B, 1, 1, S) additive in the embeddings' dtype for sdpa / eager attention, or the (B, S)
    bool padding mask transformers turns into one. A call adding one slot per row extends it with `_with_new_slot`."""
    if bool(valid.all()):
        return None
    if getattr(runner.bb.model.config, "_attn_implementation", None) not in _ADDITIVE_4D:
        return valid
    dtype = runner.bb.embed_dtype
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=valid.device)
    return torch.where(valid, torch.zeros((), dtype=dtype, device=valid.device), blocked)[:, None, None, :]


def _with_new_slot(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """`_blocked`'s mask with one more (valid) slot at the end of every row."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return torch.cat([mask, mask.new_zeros(*mask.shape[:-1], 1)], dim=-1)


class RaggedStreams:
    """Lock-step groups of rows decoded together, one backbone call per token (see the module docstring).

    Args:
        runner: the `HMTRunner` of this call.
        states: one `HMTStreamState` per group, each with its open segment's memory fixed (after `finish`); they
            are taken over (their own KV caches move into the shared one; ``state.kv`` becomes None). Rows of the
            shared batch are the groups' rows in order: group g holds rows ``blocks[g]``.
    """

    def __init__(self, runner: HMTRunner, states: Sequence[HMTStreamState]) -> None:
        if any(s.memory is None for s in states):
            raise ValueError("RaggedStreams needs every group's memory fixed (finish the states first).")
        self.runner = runner
        self.states = list(states)
        self.kv: Any = None
        self.valid: Optional[torch.Tensor] = None  # (R, S) bool
        self._mask: Optional[torch.Tensor] = None  # `_blocked(valid)`, kept up to date by `_set_valid`
        self._index_blocks()
        cached = [g for g, s in enumerate(self.states) if s.kv is not None]
        opened = [g for g, s in enumerate(self.states) if s.kv is None]
        width = max([1 + s.carry.sensory.shape[1] + s.released for s in self.states])
        device = self.states[0].pending.device
        self.valid = torch.zeros(self.rows, width, dtype=torch.bool, device=device)
        for g in cached:
            state = self.states[g]
            self._place([g], state.kv, 1 + state.carry.sensory.shape[1] + state.released)
            state.kv = None
        if opened:
            self._open(opened)
        self._sliding = self._sliding_window(self.kv)

    # ---- bookkeeping ----------------------------------------------------------------------------------------
    def _set_valid(self, valid: torch.Tensor) -> None:
        """Replace the valid-slot map (R, S) and the attention mask built from it (once per change, not per token)."""
        self.valid = valid
        self._mask = _blocked(self.runner, valid)

    def _sliding_window(self, kv: Any) -> Optional[int]:
        """The smallest sliding window of the backbone's cache layers (None without one). A sliding layer keeps
        its last ``window - 1`` slots: the shared cache is compacted before it grows that wide, which keeps every
        row's slots when a whole segment fits the window; a window shorter than a segment is refused."""
        windows = [layer.sliding_window for layer in _layers(kv) if getattr(layer, "is_sliding", False)]
        if not windows:
            return None
        need = self.runner.config.positions_per_segment
        if min(windows) < need:
            raise ValueError(
                f"The backbone's sliding attention window ({min(windows)}) is shorter than an HMT segment pass "
                f"({need} positions); lower segment_length to at most {min(windows) - need + self.runner.config.segment_length}."
            )
        return min(windows)

    def _index_blocks(self) -> None:
        sizes = [s.batch_size for s in self.states]
        self.rows = sum(sizes)
        starts = [sum(sizes[:g]) for g in range(len(sizes))]
        device = self.states[0].pending.device if self.states else None
        self.blocks = [torch.arange(a, a + n, device=device) for a, n in zip(starts, sizes)]

    def _rows_of(self, groups: Sequence[int]) -> torch.Tensor:
        return torch.cat([self.blocks[g] for g in groups])

    def _place(self, groups: Sequence[int], kv: Any, lengths: Any) -> None:
        """Put ``kv`` (a cache over the rows of ``groups``, in order) into the shared cache as those rows' only
        slots; ``lengths`` (int or (r,) tensor) are their valid slots (the first ones of each row)."""
        rows = self._rows_of(groups)
        lengths = torch.as_tensor(lengths, device=rows.device).expand(rows.numel())
        self.valid[rows] = False
        self._compact()
        width = max(self.valid.shape[1], int(lengths.max()))
        if self.kv is None:  # the first piece gives the cache its structure (layer types)
            self.kv = copy.copy(kv)
            self.kv.layers = [copy.copy(layer) for layer in _layers(kv)]
            for layer in self.kv.layers:
                shape = (self.rows, *layer.keys.shape[1:2], width, layer.keys.shape[3])
                _set(layer, layer.keys.new_zeros(shape), layer.values.new_zeros(shape))
        for mine, theirs in zip(_layers(self.kv), _layers(kv)):
            keys, values = _pad(mine.keys, width), _pad(mine.values, width)
            keys[rows], values[rows] = _pad(theirs.keys[:, :, :width], width), _pad(theirs.values[:, :, :width], width)
            _set(mine, keys, values)
        valid = torch.cat([self.valid, self.valid.new_zeros(self.rows, width - self.valid.shape[1])], dim=1)
        valid[rows] = torch.arange(width, device=rows.device).unsqueeze(0) < lengths.unsqueeze(1)
        self._set_valid(valid)

    def _compact(self) -> None:
        """Move each row's valid slots to the left (in order) and drop the columns no row uses."""
        counts = self.valid.sum(dim=1)
        width = int(counts.max()) if counts.numel() else 0
        if width == self.valid.shape[1] and bool((counts == width).all()):
            return
        order = torch.sort((~self.valid).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # (R, W)
        if self.kv is not None:
            for layer in _layers(self.kv):
                index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                _set(layer, layer.keys.gather(2, index), layer.values.gather(2, index))
        self._set_valid(torch.arange(width, device=counts.device).unsqueeze(0) < counts.unsqueeze(1))

    def _subset(self, rows: torch.Tensor) -> Any:
        """A cache over ``rows`` only (a copy: what runs on it does not touch the shared cache)."""
        sub = copy.copy(self.kv)
        sub.layers = [copy.copy(layer) for layer in _layers(self.kv)]
        for layer in sub.layers:
            _set(layer, layer.keys[rows], layer.values[rows])
        return sub

    # ---- the segment step -----------------------------------------------------------------------------------
    def _open(self, groups: Sequence[int]) -> None:
        """Run the open segment's prefix ``[m ; sensory ; pending]`` of ``groups`` in ONE call (right-padded to a
        common width; a causal pass lets no real slot see the padding) and make it their slots."""
        runner = self.runner
        pieces = []
        for g in groups:
            state = self.states[g]
            pieces.append(SegmentLayout.prefix(state.memory, state.carry.sensory, runner.bb.embed(state.pending)))
            state.released = state.pending.shape[1]
        width = max(p.shape[1] for p in pieces)
        embeds = torch.cat([torch.cat([p, p.new_zeros(p.shape[0], width - p.shape[1], p.shape[2])], dim=1)
                            for p in pieces])
        _, kv = runner.extend(embeds, None, 0)
        lengths = torch.cat([torch.full((p.shape[0],), p.shape[1], device=embeds.device) for p in pieces])
        self._place(groups, kv, lengths)

    def _roll(self, groups: Sequence[int]) -> None:
        """Close the full open segments of ``groups`` together and open the next ones."""
        runner, cfg = self.runner, self.runner.config
        rows = self._rows_of(groups)
        states = [self.states[g] for g in groups]
        sizes = [s.batch_size for s in states]
        slot = torch.cat([s.layout.write_slot(runner.write_input(s.memory), s.carry.sensory) for s in states])
        where = torch.cat([torch.full((s.batch_size,), s.layout.write_position(s.pending.shape[1]), device=rows.device)
                           for s in states])
        hidden, _ = runner.extend(slot, self._subset(rows), where, _with_new_slot(_blocked(runner, self.valid[rows])))
        # the next segments' recall queries (the rule's window among the tokens known: "previous" reads the end of
        # the closed segment, "segment" has none yet and reads [s ; s]) in one summary pass
        ended = [s.pending for s in states]
        queries: list[Optional[torch.Tensor]] = [None] * len(states)
        if cfg.use_recall:
            tokens = torch.cat(ended)
            at = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long, device=rows.device)
            queries = list(runner.recall_queries(tokens, at, at).split(sizes))
        for state, x_ids, e, query in zip(states, ended, hidden[:, 0].split(sizes), queries):
            close_segment(runner, state, x_ids, e)
            read_memory(runner, state, query=query)
        self._open(groups)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row, (R,) int64, in ONE backbone call (plus the roll-over calls of the groups whose
        segment it fills). Returns the last-layer hidden states of these tokens, (R, d)."""
        runner = self.runner
        starts = []
        for state, rows in zip(self.states, self.blocks):
            t = state.pending.shape[1]
            starts.append(torch.full((rows.numel(),), state.layout.token_position(t), device=tokens.device))
            state.pending = torch.cat([state.pending, tokens[rows].unsqueeze(1)], dim=1)
            state.tokens_seen += 1
            state.released = state.pending.shape[1]
        if self._sliding is not None and self.valid.shape[1] + 2 > self._sliding:
            self._compact()  # a sliding layer would drop the oldest slots: move every row's slots left first
        embeds = runner.bb.embed(tokens.unsqueeze(1))
        self._mask = _with_new_slot(self._mask)  # the new slot is every row's own: valid
        hidden, self.kv = runner.extend(embeds, self.kv, torch.cat(starts), self._mask)
        self.valid = torch.cat([self.valid, self.valid.new_ones(self.rows, 1)], dim=1)
        full = [g for g, s in enumerate(self.states) if s.pending.shape[1] == runner.config.segment_length]
        if full:
            self._roll(full)
        return hidden[:, 0]

    # ---- rows -----------------------------------------------------------------------------------------------
    def select(self, index: torch.Tensor) -> None:
        """Keep the rows ``index`` (R',) in that order (beam search reorders beams; finished groups leave).

        The rows of a group must stay in one block, in the order of the groups; raises `ValueError` otherwise.
        """
        keep_states, offset = [], 0
        for state, block in zip(self.states, self.blocks):
            inside = (index >= block[0]) & (index <= block[-1])
            count = int(inside.sum())
            if count == 0:
                continue
            if not bool(inside[offset : offset + count].all()):
                raise ValueError("rows of a decoding group must stay together (beams reorder within a prompt)")
            state.select(index[offset : offset + count] - block[0])
            keep_states.append(state)
            offset += count
        if offset != index.numel():
            raise ValueError("rows of a decoding group must stay together (beams reorder within a prompt)")
        dropped = index.numel() < self.rows
        self.kv.reorder_cache(index)
        self._set_valid(self.valid[index])
        self.states = keep_states
        self._index_blocks()
        if dropped:
            self._compact()
