"""Beam search for HMT generation: every beam carries its own memory state, reordered with the beams.

The scoring follows transformers' beam search: per step, log-softmax of the next-token logits, the logits
processors, plus the beam's running sum; the 2 * num_beams best continuations per prompt are visited in order, an
EOS among the first num_beams closes a hypothesis scored ``sum_logprobs / generated_len ** length_penalty``
(generated_len without the EOS), the others fill the next beams. A prompt is done when it holds num_beams
hypotheses and ``early_stopping`` says so. When a segment fills during decoding, each beam writes its own memory
(its roll-over happens in its own state), so the memory a surviving beam carries is the chosen path's.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import GenerationConfig
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput


class _Hypotheses:
    """The best ``num_beams`` finished hypotheses of one prompt."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: Any) -> None:
        self.num_beams, self.length_penalty, self.early_stopping = num_beams, length_penalty, early_stopping
        self.items: list[tuple[float, torch.Tensor, bool]] = []  # (score, generated tokens, ended with EOS)

    def add(self, tokens: torch.Tensor, sum_logprobs: float, ended: bool) -> None:
        score = sum_logprobs / (max(1, tokens.numel()) ** self.length_penalty)
        if len(self.items) < self.num_beams or score > min(s for s, _, _ in self.items):
            self.items.append((score, tokens, ended))
            self.items.sort(key=lambda item: item[0], reverse=True)
            del self.items[self.num_beams :]

    def is_done(self, best_sum_logprobs: float, generated_len: int) -> bool:
        if len(self.items) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping == "never" and self.length_penalty > 0:
            return False  # a longer hypothesis could still score higher; run to the length limit
        best_attainable = best_sum_logprobs / (max(1, generated_len) ** self.length_penalty)
        return self.items[-1][0] >= best_attainable


def beam_search(
    decoder: Any,
    input_ids: torch.Tensor,
    cfg: GenerationConfig,
    processors: Any,
    criteria: Any,
    budget: int,
    eos: Optional[torch.Tensor],
    pad: Optional[torch.Tensor],
    streamer: Any,
) -> Any:
    """Beam search over ``decoder`` (a `hmt_adapter.inference.generation.Decoder` on ``input_ids`` (B * K, T), each prompt
    repeated K = num_beams times). Returns (B * num_return_sequences, T + N) sequences (or a dict output)."""
    k = int(cfg.num_beams)
    n_return = int(cfg.num_return_sequences or 1)
    if streamer is not None:
        raise ValueError("A streamer cannot be used with beam search (as in transformers).")
    if cfg.do_sample:
        raise ValueError("Beam sampling (num_beams > 1 with do_sample=True) is not supported; set do_sample=False.")
    if n_return > k:
        raise ValueError(f"num_return_sequences ({n_return}) must be <= num_beams ({k}).")
    rows, prompt_len = input_ids.shape
    batch = rows // k
    device = input_ids.device
    length_penalty = float(cfg.length_penalty if cfg.length_penalty is not None else 1.0)
    hyps = [_Hypotheses(k, length_penalty, cfg.early_stopping) for _ in range(batch)]
    done = [False] * batch
    beam_scores = torch.zeros(batch, k, device=device)
    beam_scores[:, 1:] = -1e9  # the first step expands one beam per prompt
    beam_scores = beam_scores.view(-1)
    sequences = input_ids
    step_scores, step_logits = [], []
    eos_ids = set() if eos is None else set(eos.tolist())
    pad_id = int(pad) if pad is not None else 0
    for step in range(budget):
        logits = decoder.logits
        if cfg.output_logits:
            step_logits.append(logits.clone())
        logp = processors(sequences, torch.log_softmax(logits, dim=-1))  # (B*K, V)
        if cfg.output_scores:
            step_scores.append(logp.clone())
        vocab = logp.shape[-1]
        cand = (logp + beam_scores[:, None]).view(batch, k * vocab)
        top_scores, top_index = cand.topk(2 * k, dim=1)
        next_scores = torch.zeros(batch, k, device=device)
        next_tokens = torch.full((batch, k), pad_id, dtype=torch.long, device=device)
        next_source = torch.arange(rows, device=device).view(batch, k).clone()
        generated = sequences.shape[1] - prompt_len
        for b in range(batch):
            if done[b]:
                continue
            j = 0
            for rank in range(2 * k):
                score, index = float(top_scores[b, rank]), int(top_index[b, rank])
                source, token = b * k + index // vocab, index % vocab
                if token in eos_ids:
                    if rank < k:
                        hyps[b].add(sequences[source, prompt_len:], score, ended=True)
                    continue
                next_scores[b, j], next_tokens[b, j], next_source[b, j] = score, token, source
                j += 1
                if j == k:
                    break
            done[b] = hyps[b].is_done(float(top_scores[b].max()), generated)
        source = next_source.view(-1)
        sequences = torch.cat([sequences[source], next_tokens.view(-1, 1)], dim=1)
        beam_scores = next_scores.view(-1)
        decoder.reorder(source)
        stop = all(done) or step == budget - 1
        if len(criteria) and bool(criteria(sequences, logp).all()):
            stop = True
        if stop:
            break
        decoder.advance(next_tokens.view(-1))
    for b in range(batch):  # prompts still running: their beams are hypotheses too
        if not done[b]:
            for j in range(k):
                hyps[b].add(sequences[b * k + j, prompt_len:], float(beam_scores[b * k + j]), ended=False)
    return _finalize(input_ids[::k], hyps, n_return, sequences.shape[1] - prompt_len, eos, pad_id, cfg,
                     step_scores, step_logits)


def _finalize(prompts, hyps, n_return, max_new, eos, pad_id, cfg, step_scores, step_logits):
    """The best ``n_return`` hypotheses per prompt, EOS re-appended, padded with ``pad_token_id``."""
    out_rows, out_scores = [], []
    eos_id = int(eos[0]) if eos is not None and eos.numel() else None
    for prompt, h in zip(prompts, hyps):
        for score, tokens, ended in h.items[:n_return]:
            row = tokens.tolist() + ([eos_id] if ended and eos_id is not None else [])
            out_rows.append(prompt.tolist() + row)
            out_scores.append(score)
    width = max(len(r) for r in out_rows)
    sequences = torch.full((len(out_rows), width), pad_id, dtype=torch.long, device=prompts.device)
    for i, row in enumerate(out_rows):
        sequences[i, : len(row)] = torch.tensor(row, device=prompts.device)
    if not cfg.return_dict_in_generate:
        return sequences
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences,
        sequences_scores=torch.tensor(out_scores, device=prompts.device),
        scores=tuple(step_scores) if cfg.output_scores else None,
        logits=tuple(step_logits) if cfg.output_logits else None,
    )
