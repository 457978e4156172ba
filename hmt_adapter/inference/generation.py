"""Memory-aware generation for HMT (``peft_model.generate(...)`` lands here through `HMTModel.generate`).

How a prompt is read and continued (per row, counted on the row's real tokens):

* The prompt's full segments pass through the memory exactly as in the forward (one `HMTRunner.segment_pass`
  each: memory written, recall cache and sensory memory updated).
* The prompt's tail (the tokens of the open segment) and the new tokens are decoded with the backbone's KV cache
  inside the segment (`hmt_adapter.engine.stream`: the segment's `SegmentLayout` on the KV cache). When the segment holds ``segment_length`` tokens it
  is closed: the write position ``[m]`` is run as one more cached step, its hidden state becomes the segment's
  memory, the sensory tokens are carried, and decoding goes on in a new segment with a new KV cache.
* Recall query of the segment decoding is in: with ``recall_query="previous"`` it is the end of the previous
  segment (strictly causal: greedy output equals, step by step, the argmax of the teacher-forced forward over
  prompt + output). With ``recall_query="segment"`` (the paper's) it is computed from the tokens of the segment
  that are known when decoding enters it: the prompt's part of the segment (up to ``summary_length`` tokens; the
  question of a long-document QA prompt usually sits there); a segment opened by a roll-over during decoding has
  none, and its query is the summary pass over ``[s ; s]``.

Batches: rows may have different prompt lengths (left padding, as tokenizers pad for generation; right padding
is read the same way: each row's real tokens are its prompt). Rows with the same real length advance in lock-step
as one group; the prompts are read group by group, then ALL rows decode in ONE backbone call per new token, each at
its own position in its own segment (`hmt_adapter.engine.ragged`: one KV cache over every row, an attention mask
hiding each row's unused slots); a group whose segment fills rolls over (write slot, memory, new prefix: a few
calls, batched with the other groups rolling at that step) while the others go on. A prompt alone gives the same
output as inside a padded batch.

Supported options: greedy and sampling (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ...) and
the other logits processors transformers builds from a `GenerationConfig` (repetition penalty, min_new_tokens,
bad_words_ids, ...), ``logits_processor``, ``stopping_criteria``, ``eos_token_id`` (per row; finished rows are
padded with ``pad_token_id``), ``num_return_sequences``, ``max_new_tokens`` / ``max_length``, ``streamer``
(``TextStreamer`` / ``TextIteratorStreamer``; one sequence), ``stop_strings`` (with ``tokenizer=``),
``return_dict_in_generate`` with ``output_scores`` / ``output_logits``, beam search (``num_beams``,
``length_penalty``, ``early_stopping``, ``num_return_sequences``; `hmt_adapter.inference.beam_search`: each beam carries its
own memory state). Not supported (a `ValueError` says so): beam sampling, group beam search, assisted /
prompt-lookup / contrastive decoding, ``inputs_embeds``, classifier-free guidance, attentions and hidden states.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..engine import RaggedStreams, check_inputs, feed, finish, open_stream

_UNSUPPORTED_KWARGS = {
    "assistant_model": "assisted decoding",
    "assistant_tokenizer": "assisted decoding",
    "inputs_embeds": "`inputs_embeds` (pass input_ids)",
    "past_key_values": "`past_key_values` (HMT keeps its own per-segment cache)",
    "prefix_allowed_tokens_fn": "`prefix_allowed_tokens_fn`",
    "negative_prompt_ids": "classifier-free guidance",
    "negative_prompt_attention_mask": "classifier-free guidance",
    "synced_gpus": "`synced_gpus`",
}


def _check_config(cfg: GenerationConfig) -> None:
    """Refuse generation modes HMT generation does not implement, saying which."""
    refused = []
    if getattr(cfg, "num_beam_groups", 1) not in (None, 1):
        refused.append("group beam search (num_beam_groups > 1)")
    if getattr(cfg, "penalty_alpha", None):
        refused.append("contrastive search (penalty_alpha)")
    if getattr(cfg, "prompt_lookup_num_tokens", None):
        refused.append("prompt-lookup decoding (prompt_lookup_num_tokens)")
    if getattr(cfg, "assistant_early_exit", None):
        refused.append("self-speculative decoding (assistant_early_exit)")
    if getattr(cfg, "guidance_scale", None) not in (None, 1, 1.0):
        refused.append("classifier-free guidance (guidance_scale)")
    for flag in ("output_attentions", "output_hidden_states"):
        if getattr(cfg, flag, False):
            refused.append(f"{flag}=True (HMT's segment passes return neither)")
    if refused:
        raise ValueError("HMT generation does not support: " + "; ".join(refused) + ".")


def _prepare(hmt_model, input_ids, attention_mask, generation_config, kwargs):
    """Merge the generation config with kwargs; check inputs. Returns (config, ids, mask, processors, criteria)."""
    base = hmt_model.model
    if isinstance(attention_mask, GenerationConfig) and generation_config is None:  # HF's positional order
        generation_config, attention_mask = attention_mask, None
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    for key, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(key) is not None:
            raise ValueError(f"HMT generation does not support {what}.")
    logits_processor = kwargs.pop("logits_processor", None) or LogitsProcessorList()
    stopping_criteria = kwargs.pop("stopping_criteria", None) or StoppingCriteriaList()
    streamer = kwargs.pop("streamer", None)
    tokenizer = kwargs.pop("tokenizer", None)
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers GenerationConfig, got {type(generation_config).__name__}.")
    cfg = copy.deepcopy(generation_config if generation_config is not None else base.generation_config)
    unused = cfg.update(**{k: v for k, v in kwargs.items() if k not in _UNSUPPORTED_KWARGS})
    unused = {k: v for k, v in unused.items() if v is not None and k not in ("use_cache", "use_model_defaults")}
    if unused:
        raise ValueError(f"HMT generation got arguments it does not use: {sorted(unused)}.")
    _check_config(cfg)
    if cfg.stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: pass generate(..., tokenizer=tokenizer).")
        from transformers.generation.stopping_criteria import StopStringCriteria

        stopping_criteria = StoppingCriteriaList([*stopping_criteria, StopStringCriteria(tokenizer, cfg.stop_strings)])
    if input_ids is None:
        raise ValueError("HMT generation needs `input_ids` (batch_size, prompt_length): it cannot start from nothing.")
    check_inputs(input_ids, None, attention_mask)
    if attention_mask is None:
        pad = cfg.pad_token_id
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        if pad is not None and pad not in eos and bool((input_ids == pad).any()):
            attention_mask = (input_ids != pad).long()  # as transformers infers it
            check_inputs(input_ids, None, attention_mask)
        else:
            attention_mask = torch.ones_like(input_ids)
    if streamer is not None and input_ids.shape[0] * int(cfg.num_return_sequences or 1) != 1:
        raise ValueError("A streamer needs one sequence (batch size 1, num_return_sequences=1), as in transformers.")
    return cfg, input_ids, attention_mask, logits_processor, stopping_criteria, streamer


def _new_token_budget(cfg: GenerationConfig, prompt_len: int) -> int:
    if cfg.max_new_tokens is not None:
        budget = int(cfg.max_new_tokens)
    elif cfg.max_length is not None:
        budget = int(cfg.max_length) - prompt_len
    else:
        budget = 20
    if budget < 1:
        raise ValueError(
            f"Nothing to generate: the prompt has {prompt_len} tokens and max_length={cfg.max_length}. "
            f"Set max_new_tokens (HMT reads prompts of any length)."
        )
    return budget


class Decoder:
    """The HMT memory state of every row being decoded, and the logits of each row's next token.

    Rows with the same real prompt length advance in lock-step as one group (one stream state); the prompts are
    read group by group, then every group decodes in ONE backbone call per new token
    (`hmt_adapter.engine.ragged.RaggedStreams`). ``logits`` (B, V) float32 are the next-token logits.
    """

    def __init__(self, runner, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.runner = runner
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1)
        groups, states = [], []
        self.logits = None
        for length in torch.unique(lengths).tolist():
            rows = (lengths == length).nonzero().flatten()
            prompt = torch.stack([input_ids[r][mask[r]] for r in rows.tolist()])  # (G, length), real tokens
            state = open_stream(runner, rows.numel(), input_ids.device)
            hidden = feed(runner, state, prompt, hidden="last")
            hidden = finish(runner, state, hidden="last") or hidden  # fix the open segment's query with the prompt's part
            logits = runner.bb.logits(hidden[-1][:, -1]).float()  # (G, V)
            if self.logits is None:
                self.logits = logits.new_zeros(input_ids.shape[0], logits.shape[-1])
            self.logits[rows] = logits
            groups.append(rows)
            states.append(state)
        self.order = torch.cat(groups)  # row i of the shared decode is batch row order[i]
        self.streams = RaggedStreams(runner, states)

    def _local(self, rows: torch.Tensor) -> torch.Tensor:
        """Positions in the shared decode of batch rows ``rows`` (-1 for rows no longer decoded)."""
        position = torch.full((self.logits.shape[0],), -1, dtype=torch.long, device=rows.device)
        position[self.order] = torch.arange(self.order.numel(), device=rows.device)
        return position[rows]

    def advance(self, next_tokens: torch.Tensor, active: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Feed one token per row (B,) in one backbone call; groups with no active row stop decoding (their
        logits are no longer read). Returns the new logits (B, V)."""
        if active is not None:
            alive = [block for block in self.streams.blocks if bool(active[self.order[block]].any())]
            if len(alive) < len(self.streams.blocks) and alive:
                alive_rows = torch.cat(alive)
                self.streams.select(alive_rows)
                self.order = self.order[alive_rows]
        hidden = self.streams.step(next_tokens[self.order])
        self.logits[self.order] = self.runner.bb.logits(hidden).float()
        return self.logits

    def reorder(self, source: torch.Tensor) -> None:
        """Row r takes the state and logits of row ``source[r]`` (beam search); sources stay in r's group."""
        local = self._local(source[self.order])
        if bool((local < 0).any()):
            raise ValueError("beam search reordered a row across prompts of different lengths")
        try:
            self.streams.select(local)
        except ValueError as err:
            raise ValueError("beam search reordered a row across prompts of different lengths") from err
        self.logits = self.logits[source]


@torch.no_grad()
def generate(
    hmt_model,
    input_ids: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    generation_config: Optional[GenerationConfig] = None,
    **kwargs: Any,
) -> torch.LongTensor:
    """Generate continuations with HMT memory (see the module docstring for semantics and supported options).

    Args:
        hmt_model: the `HMTModel` (``peft_model.base_model``) with the HMT adapter active.
        input_ids: (B, T) prompt token ids, left-padded.
        attention_mask: (B, T) 1 for real tokens, 0 for padding (inferred from ``pad_token_id`` when absent).
        generation_config: a transformers `GenerationConfig`; defaults to the backbone's, updated with ``kwargs``.

    Returns:
        (B * num_return_sequences, T + N) int64: the prompts as given followed by the N new tokens (rows that
        stopped early are padded with ``pad_token_id``), like transformers' ``generate``; with
        ``return_dict_in_generate=True`` a `GenerateDecoderOnlyOutput` whose ``scores`` / ``logits`` (with
        ``output_scores`` / ``output_logits``) hold one (B, V) float32 tensor per new token (processed / raw).
    """
    cfg, input_ids, attention_mask, extra_processors, criteria, streamer = _prepare(
        hmt_model, input_ids, attention_mask, generation_config, kwargs
    )
    base = hmt_model.model
    device = input_ids.device
    beams = int(cfg.num_beams or 1)
    repeats = beams if beams > 1 else int(cfg.num_return_sequences or 1)
    if repeats > 1:  # beams, or num_return_sequences copies (greedy copies are identical, as in transformers)
        input_ids = input_ids.repeat_interleave(repeats, dim=0)
        attention_mask = attention_mask.repeat_interleave(repeats, dim=0)
    batch, prompt_len = input_ids.shape
    budget = _new_token_budget(cfg, prompt_len)
    base._prepare_special_tokens(cfg, True, device=device, batch_size=batch)
    processors = base._get_logits_processor(
        generation_config=cfg,
        input_ids_seq_length=prompt_len,
        encoder_input_ids=input_ids,
        logits_processor=extra_processors,
        device=device,
        model_kwargs={"attention_mask": attention_mask},
    )
    eos = cfg._eos_token_tensor
    pad = cfg._pad_token_tensor
    if eos is not None and pad is None:
        raise ValueError("Set pad_token_id (rows that reach eos_token_id are padded with it).")

    rows = Decoder(hmt_model.runner(), input_ids, attention_mask)
    if (cfg.num_beams or 1) > 1:
        from .beam_search import beam_search

        return beam_search(rows, input_ids, cfg, processors, criteria, budget, eos, pad, streamer)
    last_logits = rows.logits
    sequences = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    step_scores: list[torch.Tensor] = []
    step_logits: list[torch.Tensor] = []
    if streamer is not None:
        streamer.put(input_ids.cpu())  # allowed: transformers' streamer protocol hands over CPU tensors
    for step in range(budget):
        if cfg.output_logits:
            step_logits.append(last_logits.clone())
        scores = processors(sequences, last_logits)
        if cfg.output_scores:
            step_scores.append(scores.clone())
        if cfg.do_sample:
            next_tokens = torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)
        if pad is not None:
            next_tokens = torch.where(finished, pad.to(next_tokens.dtype), next_tokens)
        sequences = torch.cat([sequences, next_tokens.unsqueeze(1)], dim=1)
        if streamer is not None:
            streamer.put(next_tokens.cpu())  # allowed: as transformers does
        if eos is not None:
            finished = finished | torch.isin(next_tokens, eos)
        if len(criteria):
            finished = finished | criteria(sequences, scores)
        if bool(finished.all()) or step == budget - 1:
            break
        last_logits = rows.advance(next_tokens, active=~finished)
    if streamer is not None:
        streamer.end()
    if not cfg.return_dict_in_generate:
        return sequences
    return GenerateDecoderOnlyOutput(
        sequences=sequences,
        scores=tuple(step_scores) if cfg.output_scores else None,
        logits=tuple(step_logits) if cfg.output_logits else None,
    )
