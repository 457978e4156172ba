"""Per-token log-probabilities through the LM head without keeping (N, V) logits for backward.

Used by the fused path (TRL's ``fused_lm_head=True``) and for the loss when logits are not requested:
the forward projects tokens in chunks, and the backward recomputes each chunk's logits.
"""

from __future__ import annotations

from typing import Optional

import torch

CHUNK_TOKENS = 1024


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    logits = logits.float()
    return logits * scale if scale != 1.0 else logits


class _TokenLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, scale):
        logp = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        entropy = torch.empty_like(logp)
        top1 = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        mean_logits = torch.empty_like(logp)
        log_sum_sq = torch.empty_like(logp)
        lse_all = torch.empty_like(logp)
        for i in range(0, hidden.shape[0], CHUNK_TOKENS):
            logits = _chunk_logits(hidden[i : i + CHUNK_TOKENS], weight, bias, scale)  # (n, V) float32
            lab = labels[i : i + CHUNK_TOKENS]
            # One exp pass over the chunk serves lse, entropy and sum p^2 (the LM head dominates small models).
            top_val, top_idx = logits.max(dim=-1)
            probs = (logits - top_val.unsqueeze(1)).exp_()
            total = probs.sum(dim=-1)
            lse = top_val + total.log()
            lse_all[i : i + CHUNK_TOKENS] = lse
            probs.div_(total.unsqueeze(1))
            logp[i : i + CHUNK_TOKENS] = logits.gather(1, lab.unsqueeze(1)).squeeze(1) - lse
            entropy[i : i + CHUNK_TOKENS] = lse - torch.linalg.vecdot(probs, logits)
            top1[i : i + CHUNK_TOKENS] = top_idx == lab
            mean_logits[i : i + CHUNK_TOKENS] = logits.mean(dim=-1)
            log_sum_sq[i : i + CHUNK_TOKENS] = torch.linalg.vecdot(probs, probs).log()
        ctx.save_for_backward(hidden, weight, bias, labels, lse_all)
        ctx.scale = scale
        ctx.mark_non_differentiable(entropy, top1, mean_logits, log_sum_sq)
        return logp, entropy, top1, mean_logits, log_sum_sq

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy, _grad_top1, _grad_mean, _grad_sq):
        hidden, weight, bias, labels, lse_all = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if (need_b and bias is not None) else None
        for i in range(0, hidden.shape[0], CHUNK_TOKENS):
            h = hidden[i : i + CHUNK_TOKENS]
            logits = _chunk_logits(h, weight, bias, ctx.scale)
            # d logp / d logits = onehot(label) - softmax, scaled by the incoming gradient (in place)
            g = (logits - lse_all[i : i + CHUNK_TOKENS].unsqueeze(1)).exp_()  # softmax, from the forward's lse
            g.scatter_add_(1, labels[i : i + CHUNK_TOKENS].unsqueeze(1), -torch.ones_like(g[:, :1]))
            g.mul_((-ctx.scale * grad_logp[i : i + CHUNK_TOKENS]).unsqueeze(1))
            if need_h:
                grad_h[i : i + CHUNK_TOKENS] = (g @ weight.float()).to(hidden.dtype)
            if grad_w is not None:
                grad_w += g.t() @ h.float()
            if grad_b is not None:
                grad_b += g.sum(0)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
            None,
        )


def token_log_probs(
    hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, scale: float = 1.0, extras: bool = False,
    softcap: Optional[float] = None,
) -> tuple[torch.Tensor, ...]:
    """Log-probability of each label under the LM head, its entropy and whether it is the argmax.

    Args:
        hidden: (N, d) last-layer hidden states of the tokens to score.
        head: the LM head (an ``nn.Linear``; a 4-bit head is run as a module, with ordinary autograd).
        labels: (N,) next-token ids.
        scale: logit multiplier of the model (1.0 for most).
        softcap: the model's ``final_logit_softcapping`` (Gemma-2): logits become ``cap * tanh(logits / cap)``,
            as in `hmt_adapter.engine.backbone.Backbone.logits`. Such models take the plain autograd path.

    Returns:
        log_probs (N,) float32 with gradient; entropy (N,) and is_top1 (N,) without. With ``extras=True`` also
        mean_logits (N,) (mean logit over the vocabulary) and log_sum_sq_probs (N,) (``log sum_v p_v^2``), without
        gradient: the extra fields TRL's DPOTrainer reads from the fused LM head.
    """
    weight = getattr(head, "weight", None)
    plain = type(head) is torch.nn.Linear and weight is not None and softcap is None
    if not plain:
        logits = head(hidden).float() * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        logp_all = logits.log_softmax(-1)
        logp = logp_all.gather(1, labels.unsqueeze(1)).squeeze(1)
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            top1 = logits.argmax(-1) == labels
            mean_logits = logits.mean(-1)
            log_sum_sq = (2 * logp_all).logsumexp(-1)
        out = (logp, entropy, top1, mean_logits, log_sum_sq)
    else:
        out = _TokenLogProb.apply(hidden, weight, head.bias, labels, scale)
    return out if extras else out[:3]
