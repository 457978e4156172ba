"""The whole segment step in one function: memory read (recall), segment pass, memory write, LM-head outputs.

`segment_step` is what the forward runs for every segment, eagerly or wrapped by ``torch.compile``
(`hmt_adapter.compile`): it is the same function either way. It takes tensors only (no segment index, no lists,
no data-dependent shapes), so that it traces as one graph:

* the memory it reads comes in as a `MemorySource` resolved by the caller (`HMTRunner.memory_source`, where the
  truncated-BPTT cuts are made) and stacked: (B, N, d) values and (B, N, h) keys;
* what the LM head computes comes in as a `HeadRequest` of flat position indices built by the caller: exactly
  the kept / scored positions (eager, the least work), or every position with a mask (compiled: static shapes);
* the recall weights come back out (`StepOutput.weights`) for the caller to hand to `notify_recall`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from .lm_head import token_log_probs
from .memory import recall

if TYPE_CHECKING:
    from .runner import HMTRunner


@dataclass
class HeadRequest:
    """What the LM head computes for one segment, as indices into the segment's B * l flattened positions.

    Attributes:
        keep: (K,) positions whose logits are returned (row-major); None: no logits.
        score: (S,) positions scored against ``labels`` (S,); None: no labels.
        score_mask: (S,) bool, False where a position is not scored (the dense layout); None: all are.
        score_in_keep: (S,) row of the kept logits holding each scored position, to score from them instead of
            running the LM head again; None: run it (the chunked `token_log_probs`).
        fused: also return TRL's per-token fields (entropy, is_top1, mean logit, log sum p^2).
    """

    keep: Optional[torch.Tensor] = None
    score: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    score_mask: Optional[torch.Tensor] = None
    score_in_keep: Optional[torch.Tensor] = None
    fused: bool = False


@dataclass
class StepOutput:
    """What `segment_step` returns for B rows of a segment of width l.

    Attributes:
        memory: (B, d) the segment's memory embedding e_n, in memory space (what the cache stores).
        key: (B, h) its recall key W_k e_n (None without recall).
        weights: (B, N) recall weights over the cache (None when the memory was read as it is).
        loss_sum: () summed negative log-likelihood of the scored positions (float32).
        logits: (K, V) logits of ``HeadRequest.keep`` (None without).
        log_probs, entropy, is_top1, mean_logits, log_sum_sq_probs: (B, l) per-position fields of the fused path
            (zero where not scored; the last two are None unless ``fused``).
    """

    memory: torch.Tensor
    key: Optional[torch.Tensor]
    weights: Optional[torch.Tensor]
    loss_sum: torch.Tensor
    logits: Optional[torch.Tensor] = None
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
    params = runner.params
    weights = None
    if values is not None:
        memory, weights = recall(query, values, keys, params)
    hidden_x, e_raw = runner.segment_pass(memory, sensory, x, x_len)
    e, key = runner.encode_memory(e_raw)
    out = StepOutput(memory=e, key=key, weights=weights, loss_sum=hidden_x.new_zeros((), dtype=torch.float32))
    _head_outputs(runner, hidden_x, head, out)
    return out


def _head_outputs(runner: "HMTRunner", hidden_x: torch.Tensor, head: HeadRequest, out: StepOutput) -> None:
    """Fill ``out``'s logits, loss and per-position fields from the hidden states of x (B, l, d)."""
    bb = runner.bb
    b, l, d = hidden_x.shape
    flat = hidden_x.reshape(b * l, d)
    if head.keep is not None:
        out.logits = bb.logits(flat[head.keep])  # (K, V)
    if head.score is None:
        return
    extra: list[torch.Tensor] = []
    if head.score_in_keep is not None:
        logp_all = out.logits[head.score_in_keep].float().log_softmax(-1)
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
