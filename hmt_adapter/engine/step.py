"""The whole segment step in one function: memory read (recall), segment pass, memory write, LM-head outputs.

`segment_step` is what the forward runs for every segment, eagerly or wrapped by ``torch.compile``
(`hmt_adapter.compile`): it is the same function either way. It takes tensors only (no segment index, no lists,
no data-dependent shapes), so that it traces as one graph:

* the memory it reads comes in as a `MemorySource` resolved by the caller (`HMTRunner.memory_source`, where the
  truncated-BPTT cuts are made) and stacked: (B, N, d) values and (B, N, h) keys;
* what the LM head computes comes in as a `HeadRequest` of flat position indices built by the caller: exactly
  the kept / scored positions (eager, the least work), or every position with a mask (compiled: static shapes);
* the recall weights come back out (`StepOutput.weights`) for the caller to hand to `notify_recall`.

`run_segment` is the glue around it that every whole segment goes through, in the forward and in a stream: the
cache stacked inside the checkpoint, the step (compiled or not, checkpointed or not), the observers, the write.
"""

from __future__ import annotations

from dataclasses import dataclass
import contextlib
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch.utils.checkpoint import checkpoint

from .lm_head import token_log_probs
from .memory import notify_recall, read_memory

from .runner import MemorySource

if TYPE_CHECKING:
    from .runner import HMTRunner, MemoryState


@dataclass
class HeadRequest:
    """What the LM head computes for one segment, as indices into the segment's B * l flattened positions.

    Attributes:
        logits_at: (K,) positions whose logits are returned (row-major); None: no logits.
        score: (S,) positions scored against ``labels`` (S,); None: no labels.
        score_mask: (S,) bool, False where a position is not scored (the dense layout); None: all are.
        score_from_logits: (S,) row of the returned logits holding each scored position, to score from them instead
            of running the LM head again; None: run it (the chunked `token_log_probs`).
        fused: also return TRL's per-token fields (entropy, is_top1, mean logit, log sum p^2).
        hidden: return the last-layer hidden states of the segment's tokens instead (a stream computes the logits
            it releases itself).
    """

    logits_at: Optional[torch.Tensor] = None
    score: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    score_mask: Optional[torch.Tensor] = None
    score_from_logits: Optional[torch.Tensor] = None
    fused: bool = False
    hidden: bool = False


@dataclass
class StepOutput:
    """What `segment_step` returns for B rows of a segment of width l.

    Attributes:
        memory: (B, d) the segment's memory embedding e_n, in memory space (what the cache stores).
        key: (B, h) its recall key W_k e_n (None without recall).
        weights: (B, N) recall weights over the cache (None when the memory was read as it is).
        loss_sum: () summed negative log-likelihood of the scored positions (float32).
        logits: (K, V) logits of ``HeadRequest.logits_at`` (None without).
        hidden: (B, l, d) last-layer hidden states of the segment's tokens (``HeadRequest.hidden``; else None).
        log_probs, entropy, is_top1, mean_logits, log_sum_sq_probs: (B, l) per-position fields of the fused path
            (zero where not scored; the last two are None unless ``fused``).
    """

    memory: torch.Tensor
    key: Optional[torch.Tensor]
    weights: Optional[torch.Tensor]
    loss_sum: torch.Tensor
    logits: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None


def segment_step(
    runner: "HMTRunner",
    memory: Optional[torch.Tensor],
    query: Optional[torch.Tensor],
    values: Optional[torch.Tensor],
    keys: Optional[torch.Tensor],
    sensory: torch.Tensor,
    x: torch.Tensor,
    x_len: torch.Tensor,
    head: HeadRequest,
) -> StepOutput:
    """One segment: read m_n, run ``[m_n ; sensory ; x ; w_n]`` (w_n: `HMTRunner.write_input`), write e_n, and the LM-head outputs.

    Args:
        memory: (B, d) memory read as it is (m_0, or e_{n-1} without recall); None when recalling.
        query: (B, d) recall query; values: (B, N, d) and keys: (B, N, h) the cache (None when not recalling).
        sensory: (B, k, d); x: (B, l, d) right-padded segment embeddings; x_len: (B,) real tokens per row.
        head: what the LM head computes (`HeadRequest`).
    """
    memory, weights = read_memory(memory, query, values, keys, runner.params)
    hidden_x, e_raw = runner.segment_pass(memory, sensory, x, x_len)
    e, key = runner.encode_memory(e_raw)
    out = StepOutput(memory=e, key=key, weights=weights, loss_sum=hidden_x.new_zeros((), dtype=torch.float32))
    if head.hidden:
        out.hidden = hidden_x
    _head_outputs(runner, hidden_x, head, out)
    return out


def run_segment(
    runner: "HMTRunner",
    state: "MemoryState",
    query: Optional[torch.Tensor],
    x: torch.Tensor,
    x_len: torch.Tensor,
    head: HeadRequest,
    *,
    memory: Optional[torch.Tensor] = None,
    step: Optional[Callable[..., StepOutput]] = None,
    checkpointing: bool = False,
    sensory: Optional[torch.Tensor] = None,
    x_step: Optional[torch.Tensor] = None,
) -> tuple[StepOutput, "MemoryState"]:
    """One whole segment of B rows through the engine: read, step, write. What the forward runs per segment and a
    stream runs for a segment that arrives whole.

    Args:
        state: the `MemoryState` entering the segment; query: its recall query (B, d) (None without recall or for
            segment 0); memory: the memory (B, d) it reads when a stream has already fixed it (then ``query`` is
            not used).
        x: (B, l, d) the segment's embeddings (its last ``num_sensory`` carried as sensory memory); x_len: (B,).
        step: `segment_step` compiled by `hmt_adapter.compile` (None: eager); checkpointing: recompute the segment
            (recall included) in backward.
        sensory, x_step: what the step sees instead of ``state.sensory`` and ``x`` (the compiled step's padded,
            canonically strided copies).

    Returns:
        the step's outputs and the state entering the next segment.
    """
    source = MemorySource(memory=memory) if memory is not None else runner.memory_source(state, query)
    args = (runner, step or segment_step, source, state.sensory if sensory is None else sensory,
            x if x_step is None else x_step, x_len, head, checkpointing)
    result = checkpoint(_stack_and_step, *args, use_reentrant=False) if checkpointing else _stack_and_step(*args)
    notify_recall(result.weights)
    return result, runner.write(state, x, result.memory, result.key)


def _stack_and_step(
    runner: "HMTRunner", step: Callable[..., StepOutput], source: "MemorySource", sensory: torch.Tensor,
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


def _head_outputs(runner: "HMTRunner", hidden_x: torch.Tensor, head: HeadRequest, out: StepOutput) -> None:
    """Fill ``out``'s logits, loss and per-position fields from the hidden states of x (B, l, d)."""
    bb = runner.bb
    b, l, d = hidden_x.shape
    flat = hidden_x.reshape(b * l, d)
    if head.logits_at is not None:
        out.logits = bb.logits(flat[head.logits_at])  # (K, V)
    if head.score is None:
        return
    extra: list[torch.Tensor] = []
    if head.score_from_logits is not None:
        logp_all = out.logits[head.score_from_logits].float().log_softmax(-1)
        lp, ent, top = logp_all.gather(1, head.labels.unsqueeze(1)).squeeze(1), None, None
    else:
        lp, ent, top, *extra = token_log_probs(flat[head.score], bb.head, head.labels, bb.logit_scale, extras=head.fused,
                                            softcap=bb.final_logit_softcapping)
    mask = head.score_mask
    if mask is not None:
        lp = torch.where(mask, lp, torch.zeros_like(lp))
    out.loss_sum = -lp.sum()
    if not head.fused:
        return

    def per_position(values: torch.Tensor) -> torch.Tensor:  # (S,) -> (B, l), zero where not scored
        if mask is not None:
            values = torch.where(mask, values, torch.zeros_like(values))
        return values.new_zeros(b * l).index_copy(0, head.score, values).view(b, l)

    out.log_probs, out.entropy, out.is_top1 = per_position(lp), per_position(ent), per_position(top)
    if extra:
        out.mean_logits, out.log_sum_sq_probs = per_position(extra[0]), per_position(extra[1])
