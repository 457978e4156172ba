"""The full HMT forward: a whole (padded) batch of any length, segment by segment, as a caller of the engine.

`hmt_forward` packs the batch (padding compacted so segment borders count real tokens), computes every segment's
recall query in ONE batched summary pass, then runs the engine's step per segment (`HMTRunner.memory_source`, then
`segment_step`: recall, segment pass, memory write, LM-head outputs; compiled by `hmt_adapter.compile` or not, then
`HMTRunner.write`), checkpointing each segment when asked, and assembles the Hugging Face outputs: the
causal-LM loss across segment borders, logits (or ``logits_to_keep``), or TRL's fused-LM-head fields.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .layout import summary_window_start
from .runner import HMTRunner, MemorySource
from .step import HeadRequest, StepOutput, segment_step
from .memory import notify_recall
from .inputs import IGNORE_INDEX, PackedBatch, check_inputs, pack_batch


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


def _keep_slots(
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
    keep: Optional[torch.Tensor],
    fused: bool,
    checkpointing: bool,
    step: Optional[Callable[..., StepOutput]] = None,
) -> list[tuple[StepOutput, int, Optional[tuple[torch.Tensor, torch.Tensor]]]]:
    """Every segment of the batch in order: the one batched summary pass, then read / pass / write per segment.

    ``step`` is `segment_step` compiled by `hmt_adapter.compile` (None: run it eagerly). A compiled step gets
    static shapes: the short last segment is padded to ``segment_length`` and the LM head runs on every position
    under a mask (see `_head_request`); the growing cache's length is marked dynamic.
    """
    config = runner.config
    seg_len = config.segment_length
    num_segments = math.ceil(int(batch.lengths.max()) / seg_len)
    runner.checkpoint_recall = checkpointing
    dense = step is not None
    queries = _summary_queries(runner, batch, num_segments, checkpointing)
    state = runner.start(batch.batch_size, like=batch.embeds)
    outputs = []
    for n in range(num_segments):
        x = batch.embeds[:, n * seg_len : (n + 1) * seg_len]
        width = x.shape[1]
        x_len = (batch.lengths - n * seg_len).clamp(0, width)
        targets = None if targets_all is None else targets_all[:, n * seg_len : (n + 1) * seg_len]
        keep_idx = _segment_keep(batch, keep, n * seg_len, width, x_len)
        source = runner.memory_source(state, queries[n])
        x_in, sensory = x, state.sensory
        if dense:  # static shapes and strides for the compiled step
            x_in, targets = _pad_segment(x, targets, seg_len)
            sensory = _fresh(sensory)
            source.query = None if source.query is None else _fresh(source.query)
        head = _head_request(x_len, x_in.shape[1], targets, keep_idx, fused, dense)
        args = (runner, step or segment_step, source, sensory, x_in, x_len, head, checkpointing)
        result = checkpoint(_step, *args, use_reentrant=False) if checkpointing else _step(*args)
        notify_recall(result.weights)
        state = runner.write(state, x, result.memory, result.key)
        if dense:
            _undo_padding(result, keep_idx, width, x_in.shape[1])
        outputs.append((result, n * seg_len, keep_idx))
    return outputs


def _step(
    runner: HMTRunner, step: Callable[..., StepOutput], source: MemorySource, sensory: torch.Tensor,
    x: torch.Tensor, x_len: torch.Tensor, head: HeadRequest, checkpointing: bool,
) -> StepOutput:
    """Stack the cache (inside the checkpoint, so backward recomputes it instead of saving a copy per segment) and
    run the segment step."""
    values, keys = source.stacked()
    if values is not None and step is not segment_step:  # compiled: one graph for every cache length
        torch._dynamo.decorators.mark_unbacked(values, 1)
        torch._dynamo.decorators.mark_unbacked(keys, 1)
    with runner.bb.layer_checkpointing_off() if checkpointing else contextlib.nullcontext():
        return step(runner, source.memory, source.query, values, keys, sensory, x, x_len, head)


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
    keep_idx: Optional[tuple[torch.Tensor, torch.Tensor]], fused: bool, dense: bool,
) -> HeadRequest:
    """What the LM head computes for a segment of ``width`` positions per row (B = ``x_len.shape[0]``).

    Eager (``dense=False``): exactly the kept positions and the labelled ones, and when every real position is
    kept the loss is scored from those logits. Dense (compiled): every position, scored under a mask.
    """
    device = x_len.device
    if dense:
        every = torch.arange(x_len.shape[0] * width, device=device)
        keep = every if keep_idx is not None else None
        if targets is None:
            return HeadRequest(keep=keep, fused=fused)
        flat = targets.reshape(-1)
        return HeadRequest(
            keep=keep, score=every, labels=flat.clamp(min=0), score_mask=flat != IGNORE_INDEX, fused=fused,
            score_in_keep=None if keep is None or fused else every,
        )
    keep = None
    if keep_idx is not None and keep_idx[0].numel():
        keep = keep_idx[0] * width + keep_idx[1]
    if targets is None:
        return HeadRequest(keep=keep, fused=fused)
    valid = targets != IGNORE_INDEX
    score = valid.reshape(-1).nonzero().squeeze(1)
    score_in_keep = None
    if keep is not None and not fused and keep.numel() == int(x_len.sum()):
        # kept logits are a row-major subset of the real positions; all of them (the default): score from them
        real = torch.arange(width, device=device).unsqueeze(0) < x_len.unsqueeze(1)  # (B, l)
        score_in_keep = valid[real].nonzero().squeeze(1)
    return HeadRequest(keep=keep, score=score, labels=targets.reshape(-1)[score], score_in_keep=score_in_keep, fused=fused)


def _undo_padding(
    result: StepOutput, keep_idx: Optional[tuple[torch.Tensor, torch.Tensor]], width: int, padded: int
) -> None:
    """Bring a dense step's outputs back to the eager form: logits of the kept positions only, per-position
    fields of the segment's ``width`` real columns."""
    if result.logits is not None:
        rows, cols = keep_idx
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
    """Recall queries of every segment >= 1 of every row, from ONE batched backbone pass."""
    config = runner.config
    queries: list[Optional[torch.Tensor]] = [None] * num_segments
    if not config.use_recall or num_segments < 2:
        return queries
    seg_len, width = config.segment_length, config.summary_length
    embeds, lengths = batch.embeds, batch.lengths
    seg_starts = torch.arange(1, num_segments, device=embeds.device) * seg_len  # (S-1,)
    active = lengths.unsqueeze(1) > seg_starts.unsqueeze(0)  # (B, S-1): row has segment n
    rows, segs = active.nonzero(as_tuple=True)  # P (row, segment) pairs
    # "segment": the first `width` tokens of segment n (fewer in a short last segment);
    # "previous": the `width` tokens before segment n (segment n-1 is always full).
    first = summary_window_start(config, seg_starts[segs])  # (P,)
    cols = first.unsqueeze(1) + torch.arange(width, device=embeds.device).unsqueeze(0)  # (P, width)
    pad = max(0, int(cols.max()) + 1 - embeds.shape[1])
    padded = torch.cat([embeds, embeds.new_zeros(embeds.shape[0], pad, embeds.shape[2])], dim=1)
    tokens = padded[rows.unsqueeze(1), cols]  # (P, width, d)
    if config.recall_query == "segment":
        tok_len = (lengths[rows] - seg_starts[segs]).clamp(max=width)
    else:
        tok_len = torch.full_like(rows, width)
    if checkpointing:
        q = checkpoint(runner.summary_queries, tokens, tok_len, use_reentrant=False)
    else:
        q = runner.summary_queries(tokens, tok_len)
    full = q.new_zeros(embeds.shape[0], num_segments - 1, q.shape[-1]).index_put((rows, segs), q)
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


def _segment_keep(
    batch: PackedBatch, keep: Optional[torch.Tensor], start: int, width: int, x_len: torch.Tensor
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(rows, cols) within the segment whose logits are kept, in output order."""
    if keep is None:
        return None
    cols = torch.arange(width, device=x_len.device).unsqueeze(0)
    real = cols < x_len.unsqueeze(1)  # (B, l)
    original = batch.order[:, start : start + width] if batch.order is not None else (cols + start).expand_as(real)
    return (real & (keep[original] >= 0)).nonzero(as_tuple=True)

# ---- outputs ------------------------------------------------------------------------------------------

def _assemble(
    batch: PackedBatch,
    targets: Optional[torch.Tensor],
    results: list,
    keep: Optional[torch.Tensor],
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
    logits = _gather_logits(batch, results, keep)
    return CausalLMOutputWithPast(loss=loss, logits=logits)


def _gather_logits(batch: PackedBatch, results: list, keep: torch.Tensor) -> torch.Tensor:
    """Place each segment's kept logits at their output slots: (B, num_kept, V)."""
    rows_all, slots_all, values = [], [], []
    for result, start, (rows, cols) in results:
        if result.logits is None:
            continue
        compact_pos = cols + start
        original = batch.order[rows, compact_pos] if batch.order is not None else compact_pos
        rows_all.append(rows)
        slots_all.append(keep[original])
        values.append(result.logits)
    if not values:
        raise ValueError("No logits were kept: `logits_to_keep` selected only padding positions.")
    num_kept = int((keep >= 0).sum())
    b, vocab = batch.batch_size, values[0].shape[-1]
    if len(values) == len(results) and _keeps_every_position_in_order(batch, keep, results):
        # common case (no padding, every logit kept): one concatenation instead of zero-fill + scatter
        return torch.cat([v.view(b, -1, vocab) for v in values], dim=1)
    out = values[0].new_zeros(b, num_kept, vocab)
    for rows, slots, value in zip(rows_all, slots_all, values):  # in place: no (B, T, V) temporaries
        out.index_put_((rows, slots), value)
    return out


def _keeps_every_position_in_order(batch: PackedBatch, keep: torch.Tensor, results: list) -> bool:
    """True when there is no padding and output slot t holds position t for every t of every row."""
    if batch.order is not None:
        return False
    total = sum(int(result.logits.shape[0]) for result, _, _ in results)
    if total != batch.batch_size * batch.total_length:
        return False
    return bool((keep == torch.arange(keep.numel(), device=keep.device)).all())


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
    keep = _keep_slots(batch.total_length, logits_to_keep, batch.embeds.device, fused_lm_head)
    config = runner.config
    targets = _scored_targets(batch, config.segment_length, config.loss_scope)
    results = _run_segments(runner, batch, targets, keep, fused_lm_head, checkpointing, step)
    return _assemble(batch, targets, results, keep, fused_lm_head, shift_labels is not None, num_items_in_batch)
