"""`HMTModel`: the PEFT tuner that runs a causal LM segment by segment with hierarchical memory."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .backbone import Backbone, check_backbone, input_embedding_width
from .config import HMTConfig
from .layer import HMTLayer, HMTTunerLayer
from .lora import HMTLoraLinear, lora_target_names
from .loss import token_log_probs
from .memory import HMTParams
from .recurrence import HMTRunner
from .segments import IGNORE_INDEX, PackedBatch, check_inputs, pack_batch

_UNSUPPORTED_WITH_HMT = ("past_key_values", "position_ids", "cache_position")


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


@dataclass
class _SegmentResult:
    e_raw: torch.Tensor  # (B, d) hidden state at the write position
    loss_sum: torch.Tensor  # () summed NLL of the segment's scored tokens
    log_probs: Optional[torch.Tensor]  # (B, l) per-token log-probs (fused path)
    entropy: Optional[torch.Tensor]
    is_top1: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]  # (N_keep, V) logits of the kept positions
    mean_logits: Optional[torch.Tensor] = None  # (B, l) fused path: mean logit over the vocabulary (TRL's DPO)
    log_sum_sq_probs: Optional[torch.Tensor] = None  # (B, l) fused path: log sum_v p_v^2 (TRL's DPO weighting)


class HMTModel(BaseTuner):
    """Hierarchical Memory Transformer adapter (see `HMTConfig` and DESIGN.md).

    Attach it with ``peft.get_peft_model(model, HMTConfig(...))``. The forward reads inputs of any length:

    Input shape: ``input_ids`` (batch_size, seq_len), ``attention_mask`` (batch_size, seq_len), left or right
    padded; ``labels`` (batch_size, seq_len) with -100 for ignored tokens.
    Output: ``CausalLMOutputWithPast`` with ``loss`` (the causal-LM loss over every labelled token, across
    segment borders) and ``logits`` (batch_size, seq_len or logits_to_keep, vocab_size); or, with
    ``fused_lm_head=True``, an `HMTFusedOutput` of per-token log-probabilities and no logits.
    """

    prefix: str = "hmt_"
    tuner_layer_cls = HMTTunerLayer
    target_module_mapping: dict[str, list[str]] = {}

    # ---- injection (PEFT's own `inject_adapter`, through its hooks) ---------------------------------------
    def _prepare_adapter_config(self, peft_config: HMTConfig, model_config: dict) -> HMTConfig:
        """Check the backbone and resolve the modules this adapter wraps, before PEFT changes anything.

        ``target_modules`` becomes the input-embedding module (HMT's parameters) plus, with ``lora_r > 0``, the
        modules ``lora_target_modules`` selects. ``base_embedding_dim`` records the backbone's embedding width.
        """
        if not isinstance(peft_config, HMTConfig):
            raise TypeError(f"HMTModel needs an HMTConfig, got {type(peft_config).__name__}.")
        check_backbone(self.model, peft_config)
        peft_config.base_embedding_dim = input_embedding_width(self.model)
        targets = [self._input_embeddings_name(self.model)]
        if peft_config.lora_r > 0:
            targets += lora_target_names(self.model, peft_config.lora_target_modules)
        peft_config.target_modules = targets
        return peft_config

    def _create_and_replace(
        self,
        peft_config: HMTConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, HMTTunerLayer):
            target.update_layer(adapter_name, peft_config)
            return
        if target is self.model.get_input_embeddings():
            new_module = HMTLayer(target, adapter_name, peft_config)
        else:
            new_module = HMTLoraLinear(target, adapter_name, peft_config)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _input_embeddings_name(model: nn.Module) -> str:
        embeddings = model.get_input_embeddings()
        for name, module in model.named_modules():
            if module is embeddings:
                return name
        raise TypeError(f"Could not locate the input embeddings of {type(model).__name__} among its modules.")

    # ---- helpers ------------------------------------------------------------------------------------------
    def hmt_layer(self) -> HMTLayer:
        """The `HMTLayer` holding this model's HMT parameters (it wraps the backbone's input embeddings)."""
        layer = self.model.get_input_embeddings()
        if not isinstance(layer, HMTLayer):
            raise ValueError("This model has no HMT layer: the adapter was unloaded.")
        return layer

    def _active_hmt_adapter(self) -> Optional[str]:
        """The active HMT adapter's name; None when no adapter is active (e.g. after deleting the last one)."""
        adapters = self.active_adapters
        if not adapters:
            return None
        if len(adapters) != 1:
            raise ValueError(f"HMT runs one adapter at a time; active adapters are {adapters}. Call set_adapter(name).")
        return adapters[0]

    @property
    def hmt_config(self) -> HMTConfig:
        """Config of the active HMT adapter."""
        name = self._active_hmt_adapter()
        if name is None:
            raise ValueError("No HMT adapter is active. Call set_adapter(name) or add an adapter.")
        return self.peft_config[name]

    def runner(self) -> HMTRunner:
        """An `HMTRunner` for the active adapter (stateless; build one per call)."""
        config = self.hmt_config
        params = HMTParams.from_layer(self.hmt_layer(), self.active_adapters[0], config)
        return HMTRunner(Backbone(self.model), params, config)

    def _adapter_enabled(self) -> bool:
        """False when the model must behave as the bare backbone: adapters disabled, or none active."""
        if self._active_hmt_adapter() is None:
            return False
        return not self.hmt_layer().disable_adapters

    def _checkpointing(self, backbone: Backbone) -> bool:
        return backbone.is_gradient_checkpointing and self.training and torch.is_grad_enabled()

    def merge_and_unload(self, *args: Any, **kwargs: Any):
        raise ValueError(
            "HMT cannot be merged into the backbone's weights: its memory is computed at run time. Use `unload()` to "
            "get the plain backbone back."
        )

    def add_weighted_adapter(self, *args: Any, **kwargs: Any):
        raise ValueError("HMT adapters cannot be combined by weighting: each carries its own memory. Use set_adapter.")

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        *,
        fused_lm_head: bool = False,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
        shift_labels: Optional[torch.Tensor] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        use_cache: Optional[bool] = None,
        **kwargs: Any,
    ) -> Union[CausalLMOutputWithPast, HMTFusedOutput]:
        """Run the backbone over the input segment by segment with HMT memory (see the class docstring).

        ``fused_lm_head=True`` follows TRL's fused-LM-head protocol: per-token ``log_probs``, ``entropy``,
        ``is_top1`` and ``label_mask``, never more than one segment's worth of logits at a time.
        ``logits_to_keep`` keeps the logits of the last N positions (int > 0) or of the given positions
        (1-D tensor), as transformers models do; the loss still covers every labelled token.
        """
        if not self._adapter_enabled():
            passthrough = dict(kwargs, use_cache=use_cache, return_dict=return_dict)
            if fused_lm_head:
                passthrough["fused_lm_head"] = True
            if shift_labels is not None:
                passthrough["shift_labels"] = shift_labels
            if num_items_in_batch is not None:
                passthrough["num_items_in_batch"] = num_items_in_batch
            if not isinstance(logits_to_keep, int) or logits_to_keep != 0:
                passthrough["logits_to_keep"] = logits_to_keep
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                output_attentions=output_attentions, output_hidden_states=output_hidden_states, **passthrough,
            )
        self._reject_unsupported(kwargs, output_attentions, output_hidden_states, labels, shift_labels)
        check_inputs(input_ids, inputs_embeds, attention_mask, labels if labels is not None else shift_labels)
        runner = self.runner()
        batch = pack_batch(runner.bb.embed, input_ids, inputs_embeds, attention_mask, labels, shift_labels)
        keep = self._keep_slots(batch.total_length, logits_to_keep, batch.embeds.device, fused_lm_head)
        config = runner.config
        targets = self._scored_targets(batch, config.segment_length, config.loss_scope)
        results = self._run_segments(runner, batch, targets, keep, fused_lm_head)
        return self._assemble(batch, targets, results, keep, fused_lm_head, shift_labels is not None, num_items_in_batch)

    def _reject_unsupported(self, kwargs, output_attentions, output_hidden_states, labels, shift_labels) -> None:
        for key in _UNSUPPORTED_WITH_HMT:
            if kwargs.get(key) is not None:
                raise ValueError(
                    f"`{key}` is not supported by the HMT forward: HMT assigns positions and caches per segment itself. "
                    f"Use model.generate(...) for cached decoding; for TRL, set padding_free=False."
                )
        unknown = sorted(k for k in kwargs if k not in _UNSUPPORTED_WITH_HMT)
        if unknown:
            raise TypeError(f"HMT forward got unexpected arguments {unknown}.")
        if output_attentions or output_hidden_states:
            raise ValueError("HMT forward does not return attentions or hidden states; set them to False.")
        if labels is not None and shift_labels is not None:
            raise ValueError("Pass either `labels` or `shift_labels`, not both.")

    @staticmethod
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
        self,
        runner: HMTRunner,
        batch: PackedBatch,
        targets_all: Optional[torch.Tensor],
        keep: Optional[torch.Tensor],
        fused: bool,
    ) -> list[tuple[_SegmentResult, torch.Tensor, torch.Tensor]]:
        config = runner.config
        seg_len = config.segment_length
        num_segments = math.ceil(int(batch.lengths.max()) / seg_len)
        checkpointing = self._checkpointing(runner.bb)
        runner.checkpoint_recall = checkpointing
        queries = self._summary_queries(runner, batch, num_segments, checkpointing)
        cache = runner.new_cache()
        sensory = batch.embeds[:, :0]
        last_memory = None
        outputs = []
        for n in range(num_segments):
            x = batch.embeds[:, n * seg_len : (n + 1) * seg_len]
            x_len = (batch.lengths - n * seg_len).clamp(0, x.shape[1])
            memory, _ = runner.read_memory(n, queries[n], cache, last_memory, batch.batch_size)
            targets = None if targets_all is None else targets_all[:, n * seg_len : (n + 1) * seg_len]
            keep_idx = self._segment_keep(batch, keep, n * seg_len, x.shape[1], x_len)
            step = (runner, memory, sensory, x, x_len, targets, keep_idx, fused)
            if checkpointing:
                result = checkpoint(self._segment_step, *step, use_reentrant=False)
            else:
                result = self._segment_step(*step)
            last_memory = runner.write_memory(result.e_raw, cache, n)
            if n + 1 < num_segments:
                sensory = runner.next_sensory(sensory, x, n)
            outputs.append((result, n * seg_len, keep_idx))
        return outputs

    def _segment_step(
        self,
        runner: HMTRunner,
        memory: torch.Tensor,
        sensory: torch.Tensor,
        x: torch.Tensor,
        x_len: torch.Tensor,
        targets: Optional[torch.Tensor],
        keep_idx: Optional[tuple[torch.Tensor, torch.Tensor]],
        fused: bool,
    ) -> _SegmentResult:
        """One segment: backbone pass, memory hidden state, loss and the requested per-token outputs."""
        bb = runner.bb
        with bb.layer_checkpointing_off() if self._checkpointing(bb) else contextlib.nullcontext():
            hidden_x, e_raw = runner.segment_pass(memory, sensory, x, x_len)
        logits = None
        if keep_idx is not None and keep_idx[0].numel():
            logits = bb.logits(hidden_x[keep_idx[0], keep_idx[1]])  # (N_keep, V)
        loss_sum = hidden_x.new_zeros((), dtype=torch.float32)
        log_probs = entropy = is_top1 = None
        extra = None  # also when there are no labels (plain inference)
        if targets is not None:
            valid = targets != IGNORE_INDEX
            labels = targets[valid]
            # Kept logits are a row-major subset of the segment's real positions; when they are all of them (the
            # default), score from them instead of running the LM head again.
            all_kept = logits is not None and keep_idx[0].numel() == int(x_len.sum())
            if fused or not all_kept:
                lp, ent, top, *extra = token_log_probs(hidden_x[valid], bb.head, labels, bb.logit_scale, extras=fused)
            else:
                real = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < x_len.unsqueeze(1)  # (B, l)
                lp = logits[valid[real]].float().log_softmax(-1).gather(1, labels.unsqueeze(1)).squeeze(1)
            loss_sum = -lp.sum()
            if fused:
                log_probs = lp.new_zeros(valid.shape).masked_scatter(valid, lp)
                entropy = ent.new_zeros(valid.shape).masked_scatter(valid, ent)
                is_top1 = top.new_zeros(valid.shape).masked_scatter(valid, top)
                extra = [t.new_zeros(valid.shape).masked_scatter(valid, t) for t in extra]
        if extra:
            return _SegmentResult(e_raw, loss_sum, log_probs, entropy, is_top1, logits, *extra)
        return _SegmentResult(e_raw, loss_sum, log_probs, entropy, is_top1, logits)

    def _summary_queries(
        self, runner: HMTRunner, batch: PackedBatch, num_segments: int, checkpointing: bool
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
        first = seg_starts[segs] - (width if config.recall_query == "previous" else 0)  # (P,)
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

    @staticmethod
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

    @staticmethod
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
        self,
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
            denom = count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
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
        logits = self._gather_logits(batch, results, keep)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @staticmethod
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
        if len(values) == len(results) and HMTModel._keeps_every_position_in_order(batch, keep, results):
            # common case (no padding, every logit kept): one concatenation instead of zero-fill + scatter
            return torch.cat([v.view(b, -1, vocab) for v in values], dim=1)
        out = values[0].new_zeros(b, num_kept, vocab)
        for rows, slots, value in zip(rows_all, slots_all, values):  # in place: no (B, T, V) temporaries
            out.index_put_((rows, slots), value)
        return out

    @staticmethod
    def _keeps_every_position_in_order(batch: PackedBatch, keep: torch.Tensor, results: list) -> bool:
        """True when there is no padding and output slot t holds position t for every t of every row."""
        if batch.order is not None:
            return False
        total = sum(int(result.logits.shape[0]) for result, _, _ in results)
        if total != batch.batch_size * batch.total_length:
            return False
        return bool((keep == torch.arange(keep.numel(), device=keep.device)).all())

    # ---- generation ---------------------------------------------------------------------------------------
    def generate(self, *args: Any, **kwargs: Any):
        """Memory-aware generation; see `hmt_adapter.generation.generate`."""
        if not self._adapter_enabled():
            return self.model.generate(*args, **kwargs)
        from .generation import generate

        return generate(self, *args, **kwargs)


