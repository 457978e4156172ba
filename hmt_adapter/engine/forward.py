"""The full HMT forward: a whole (padded) batch of any length, segment by segment, as a caller of the engine.

`hmt_forward` packs the batch (padding compacted so segment borders count real tokens), computes every segment's
recall query in ONE batched summary pass (`HMTRunner.recall_queries`), then runs each segment through
`run_segment` (`HMTRunner.memory_source`, `segment_step`: recall, segment pass, memory write, LM-head outputs;
compiled by `hmt_adapter.compile` or not; checkpointed when asked), and assembles the Hugging Face outputs: the
causal-LM loss across segment borders, logits (or ``logits_to_keep``), or TRL's fused-LM-head fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .inputs import IGNORE_INDEX, PackedBatch, check_inputs, pack_batch
from .runner import HMTRunner
from .step import HeadRequest, StepOutput, run_segment


@dataclass
class HMTFusedOutput(ModelOutput):
    """Output of ``forward(..., fused_lm_head=True)``, the fields TRL's trainers read.

    Per-token fields have shape (batch, seq_len - 1) (or (batch, seq_len) with ``shift_labels``), are aligned
    with the inputs as in Hugging Face (position t scores the label at t + 1) and are zero where the label is
    ignored. ``loss`` is the mean negative log-likelihood over ``label_mask`` (or divided by
    ``num_items_in_batch``).
    """

    loss: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    label_mask: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None


def _logit_slots(
    length: int, logits_to_keep: Union[int, torch.Tensor], device: torch.device, fused: bool
) -> Optional[torch.Tensor]:
    """slot[t] = output index of original position t's logits, -1 if not kept; None when no logits."""
    if fused:
        return None
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() != 1:
            raise ValueError("`logits_to_keep` as a tensor must be a 1-D tensor of positions.")
        positions = logits_to_keep.to(device).long()
    elif isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool) and logits_to_keep >= 0:
        start = 0 if logits_to_keep == 0 else max(0, length - logits_to_keep)
        positions = torch.arange(start, length, device=device)
    else:
        raise ValueError(f"`logits_to_keep` must be an int >= 0 or a 1-D tensor, got {logits_to_keep!r}.")
    if positions.numel() and (positions.min() < 0 or positions.max() >= length):
        raise ValueError(f"`logits_to_keep` positions must lie in [0, {length}), got {positions.tolist()}.")
    slots = torch.full((length,), -1, dtype=torch.long, device=device)
    slots[positions] = torch.arange(positions.numel(), device=device)
    return slots


# ---- the segment loop ---------------------------------------------------------------------------------

def _run_segments(
    runner: HMTRunner,
    batch: PackedBatch,
    targets_all: Optional[torch.Tensor],
    slots: Optional[torch.Tensor],
    fused: bool,
    checkpointing: bool,
    step: Optional[Callable[..., StepOutput]] = None,
) -> list[tuple[StepOutput, int, Optional[tuple[torch.Tensor, torch.Tensor]]]]:
    """Every segment of the batch in order: the one batched summary pass, then `run_segment` per segment.

    ``step`` is `segment_step` compiled by `hmt_adapter.compile` (None: run it eagerly). A compiled step gets
    static shapes: the short last segment is padded to ``segment_length`` and the LM head runs on every position
    under a mask (see `_head_request`); the growing cache's length is marked dynamic.
    """
    seg_len = runner.config.segment_length
    num_segments = math.ceil(int(batch.lengths.max()) / seg_len)
    dense = step is not None
    queries = _summary_queries(runner, batch, num_segments, checkpointing)
    state = runner.start(batch.batch_size, like=batch.embeds)
    outputs = []
    for n in range(num_segments):
        x = batch.embeds[:, n * seg_len : (n + 1) * seg_len]
        width = x.shape[1]
        x_len = (batch.lengths - n * seg_len).clamp(0, width)
        targets = None if targets_all is None else targets_all[:, n * seg_len : (n + 1) * seg_len]
        kept = _segment_logit_positions(batch, slots, n * seg_len, width, x_len)
        query, x_step, sensory = queries[n], x, state.sensory
        if dense:  # static shapes and strides for the compiled step
            x_step, targets = _pad_segment(x, targets, seg_len)
            sensory = _fresh(sensory)
            query = None if query is None else _fresh(query)
        head = _head_request(x_len, x_step.shape[1], targets, kept, fused, dense)
        result, state = run_segment(runner, state, query, x, x_len, head, step=step, checkpointing=checkpointing,
                                    sensory=sensory, x_step=x_step)
        if dense:
            _undo_padding(result, kept, width, x_step.shape[1])
        outputs.append((result, n * seg_len, kept))
    return outputs


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A copy with canonical strides: a slice of a longer tensor keeps strides that depend on the input's length
    (even along size-1 dims), and the compiled step's guards check strides."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _pad_segment(
    x: torch.Tensor, targets: Optional[torch.Tensor], seg_len: int
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A segment (B, l, d) right-padded to (B, seg_len, d) (targets (B, l) with IGNORE_INDEX), canonical strides."""
    b, width, d = x.shape
    padded = x.new_zeros(b, seg_len, d)
    padded[:, :width] = x
    if targets is not None:
        full = targets.new_full((b, seg_len), IGNORE_INDEX)
        full[:, :width] = targets
        targets = full
    return padded, targets


def _head_request(
    x_len: torch.Tensor, width: int, targets: Optional[torch.Tensor],
    kept: Optional[tuple[torch.Tensor, torch.Tensor]], fused: bool, dense: bool,
) -> HeadRequest:
    """What the LM head computes for a segment of ``width`` positions per row (B = ``x_len.shape[0]``).

    Eager (``dense=False``): exactly the kept positions and the labelled ones, and when every real position is
    kept the loss is scored from those logits. Dense (compiled): every position, scored under a mask.
    """
    device = x_len.device
    if dense:
        every = torch.arange(x_len.shape[0] * width, device=device)
        logits_at = every if kept is not None else None
        if targets is None:
            return HeadRequest(logits_at=logits_at, fused=fused)
        flat = targets.reshape(-1)
        return HeadRequest(
            logits_at=logits_at, score=every, labels=flat.clamp(min=0), score_mask=flat != IGNORE_INDEX, fused=fused,
            score_from_logits=None if logits_at is None or fused else every,
        )
    logits_at = None
    if kept is not None and kept[0].numel():
        logits_at = kept[0] * width + kept[1]
    if targets is None:
        return HeadRequest(logits_at=logits_at, fused=fused)
    valid = targets != IGNORE_INDEX
    score = valid.reshape(-1).nonzero().squeeze(1)
    score_from_logits = None
    if logits_at is not None and not fused and logits_at.numel() == int(x_len.sum()):
        # kept logits are a row-major subset of the real positions; all of them (the default): score from them
        real = torch.arange(width, device=device).unsqueeze(0) < x_len.unsqueeze(1)  # (B, l)
        score_from_logits = valid[real].nonzero().squeeze(1)
    return HeadRequest(logits_at=logits_at, score=score, labels=targets.reshape(-1)[score], score_from_logits=score_from_logits, fused=fused)


def _undo_padding(
    result: StepOutput, kept: Optional[tuple[torch.Tensor, torch.Tensor]], width: int, padded: int
) -> None:
    """Bring a dense step's outputs back to the eager form: logits of the kept positions only, per-position
    fields of the segment's ``width`` real columns."""
    if result.logits is not None:
        rows, cols = kept
        if not rows.numel():
            result.logits = None
        elif rows.numel() != result.logits.shape[0]:  # else every position of a full segment is kept, in order
            result.logits = result.logits[rows * padded + cols]
    for name in ("log_probs", "entropy", "is_top1", "mean_logits", "log_sum_sq_probs"):
        value = getattr(result, name)
        if value is not None and value.shape[1] != width:
            setattr(result, name, value[:, :width])


def _summary_queries(
    runner: HMTRunner, batch: PackedBatch, num_segments: int, checkpointing: bool
) -> list[Optional[torch.Tensor]]:
    """Recall queries of every segment >= 1 of every row, from ONE batched summary pass (`HMTRunner.recall_queries`)."""
    queries: list[Optional[torch.Tensor]] = [None] * num_segments
    if not runner.config.use_recall or num_segments < 2:
        return queries
    lengths = batch.lengths
    seg_starts = torch.arange(1, num_segments, device=lengths.device) * runner.config.segment_length  # (S-1,)
    rows, segs = (lengths.unsqueeze(1) > seg_starts.unsqueeze(0)).nonzero(as_tuple=True)  # P (row, segment) pairs
    args = (batch.embeds, seg_starts[segs], lengths[rows], rows)
    q = checkpoint(runner.recall_queries, *args, use_reentrant=False) if checkpointing else runner.recall_queries(*args)
    full = q.new_zeros(batch.batch_size, num_segments - 1, q.shape[-1]).index_put((rows, segs), q)
    for n in range(1, num_segments):
        queries[n] = full[:, n - 1]
    return queries


def _scored_targets(batch: PackedBatch, seg_len: int, scope: str) -> Optional[torch.Tensor]:
    """Compact next-token targets; under loss_scope='last_segment', only the last segment's tokens.

    As the reference implementation scores them: the last ``segment_length`` labels of each row (all of them
    when the row is shorter), the first one predicted from the position before them. Target column p holds the
    label of token p + 1, so the scored columns are p >= length - segment_length - 1.
    """
    if batch.next_labels is None or scope == "all":
        return batch.next_labels
    first = batch.lengths - seg_len - 1  # (B,) first scored column (negative: the whole row)
    positions = torch.arange(batch.total_length, device=batch.lengths.device).unsqueeze(0)
    return batch.next_labels.masked_fill(positions < first.unsqueeze(1), IGNORE_INDEX)


def _segment_logit_positions(
    batch: PackedBatch, slots: Optional[torch.Tensor], start: int, width: int, x_len: torch.Tensor
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(rows, cols) within the segment whose logits are returned, in output order (None: no logits)."""
    if slots is None:
        return None
    cols = torch.arange(width, device=x_len.device).unsqueeze(0)
    real = cols < x_len.unsqueeze(1)  # (B, l)
    original = batch.order[:, start : start + width] if batch.order is not None else (cols + start).expand_as(real)
    return (real & (slots[original] >= 0)).nonzero(as_tuple=True)

# ---- outputs ------------------------------------------------------------------------------------------

def _assemble(
    batch: PackedBatch,
    targets: Optional[torch.Tensor],
    results: list,
    slots: Optional[torch.Tensor],
    fused: bool,
    pre_shifted: bool,
    num_items_in_batch,
) -> Union[CausalLMOutputWithPast, HMTFusedOutput]:
    loss = None
    label_mask = None
    if batch.next_labels is not None:
        label_mask_compact = targets != IGNORE_INDEX  # only the tokens the loss scope scores
        count = label_mask_compact.sum()
        total = torch.stack([r.loss_sum for r, _, _ in results]).sum()
        # No scored label: 0 / 0 = nan, as transformers' causal-LM loss gives (not a silent 0.0).
        denom = count if num_items_in_batch is None else num_items_in_batch
        loss = total / torch.as_tensor(denom, device=total.device)
        label_mask = batch.to_original(label_mask_compact)
    if fused:
        if batch.next_labels is None:
            raise ValueError("`fused_lm_head=True` needs `labels` (or `shift_labels`) to score.")
        per_token = []
        for field in ("log_probs", "entropy", "is_top1", "mean_logits", "log_sum_sq_probs"):
            compact = torch.cat([getattr(r, field) for r, _, _ in results], dim=1)
            per_token.append(batch.to_original(compact))
        if not pre_shifted:
            per_token = [t[:, :-1] for t in per_token]
            label_mask = label_mask[:, :-1]
        log_probs, entropy, is_top1, mean_logits, log_sum_sq_probs = per_token
        return HMTFusedOutput(
            loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1, label_mask=label_mask,
            mean_logits=mean_logits, log_sum_sq_probs=log_sum_sq_probs,
        )
    logits = _gather_logits(batch, results, slots)
    return CausalLMOutputWithPast(loss=loss, logits=logits)


def _gather_logits(batch: PackedBatch, results: list, slots: torch.Tensor) -> torch.Tensor:
    """Place each segment's kept logits at their output slots: (B, num_kept, V)."""
    rows_all, slots_all, values = [], [], []
    for result, start, (rows, cols) in results:
        if result.logits is None:
            continue
        compact_pos = cols + start
        original = batch.order[rows, compact_pos] if batch.order is not None else compact_pos
        rows_all.append(rows)
        slots_all.append(slots[original])
        values.append(result.logits)
    if not values:
        raise ValueError("No logits were kept: `logits_to_keep` selected only padding positions.")
    num_kept = int((slots >= 0).sum())
    b, vocab = batch.batch_size, values[0].shape[-1]
    if len(values) == len(results) and _every_position_in_order(batch, slots, results):
        # common case (no padding, every logit kept): one concatenation instead of zero-fill + scatter
        return torch.cat([v.view(b, -1, vocab) for v in values], dim=1)
    out = values[0].new_zeros(b, num_kept, vocab)
    for rows, slots, value in zip(rows_all, slots_all, values):  # in place: no (B, T, V) temporaries
        out.index_put_((rows, slots), value)
    return out


def _every_position_in_order(batch: PackedBatch, slots: torch.Tensor, results: list) -> bool:
    """True when there is no padding and output slot t holds position t for every t of every row."""
    if batch.order is not None:
        return False
    total = sum(int(result.logits.shape[0]) for result, _, _ in results)
    if total != batch.batch_size * batch.total_length:
        return False
    return bool((slots == torch.arange(slots.numel(), device=slots.device)).all())


def hmt_forward(
    runner: HMTRunner,
    input_ids: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    inputs_embeds: Optional[torch.Tensor],
    labels: Optional[torch.Tensor],
    shift_labels: Optional[torch.Tensor],
    *,
    fused_lm_head: bool,
    logits_to_keep: Union[int, torch.Tensor],
    num_items_in_batch: Optional[Union[int, torch.Tensor]],
    checkpointing: bool,
    step: Optional[Callable[..., StepOutput]] = None,
) -> Union[CausalLMOutputWithPast, "HMTFusedOutput"]:
    """Run one HMT adapter over a batch (see `HMTModel.forward` for the arguments and outputs).

    Input shape: ``input_ids`` / ``attention_mask`` / ``labels`` (batch_size, seq_len) (or ``inputs_embeds``
    (batch_size, seq_len, d)); ``checkpointing``: recompute each segment (and the summary pass) in backward;
    ``step``: the compiled `segment_step` (`hmt_adapter.compile`), None to run it eagerly.
    """
    check_inputs(input_ids, inputs_embeds, attention_mask, labels if labels is not None else shift_labels)
    batch = pack_batch(runner.bb.embed, input_ids, inputs_embeds, attention_mask, labels, shift_labels)
    slots = _logit_slots(batch.total_length, logits_to_keep, batch.embeds.device, fused_lm_head)
    config = runner.config
    targets = _scored_targets(batch, config.segment_length, config.loss_scope)
    results = _run_segments(runner, batch, targets, slots, fused_lm_head, checkpointing, step)
    return _assemble(batch, targets, results, slots, fused_lm_head, shift_labels is not None, num_items_in_batch)
