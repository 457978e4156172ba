"""`HMTModel`: the PEFT tuner that runs a causal LM segment by segment with hierarchical memory."""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import _get_input_embeddings_name  # private: docs/design.md, "What stays private"
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import HMTConfig
from ..engine import (
    Backbone, HMTFusedOutput, HMTRunner, check_causal_lm, hmt_forward, input_embedding_width, max_positions,
    output_hidden_width,
)
from ..inference.generation import generate as hmt_generate
from ._peft_shim import HMT_PREFIX
from .weights import ADAPTER_KEY_MARKER, KEY_PREFIX
from .layer import HMTLayer, HMTTunerLayer
from .lora import HMTLoraLinear, lora_target_names
from .model_card import describe_backbone_for_card

_UNSUPPORTED_WITH_HMT = ("past_key_values", "position_ids", "cache_position")


def _names_module(target: str, name: str) -> bool:
    """Whether a ``target_modules`` entry selects module ``name`` (PEFT's rule: the full name or a suffix)."""
    return name == target or name.endswith("." + target)


def _check_saved_adapter_fits(model: nn.Module, config: HMTConfig, embedding: str, lora: list[str]) -> None:
    """Raise `ValueError` unless the saved adapter ``config`` describes has exactly the HMT keys it gets on ``model``.

    PEFT loads adapter weights with ``strict=False`` and only warns about missing keys: an adapter saved on a
    Llama and loaded onto a GPT-2 of the same width would run with freshly initialised HMT weights. Compared: the
    weights file's keys when the config was read from a local directory (``saved_weight_keys``), otherwise, for a
    config that records an attached backbone, its saved ``target_modules`` (module paths or PEFT's suffixes of them).
    """
    here = [embedding, *lora]
    saved = config.saved_weight_keys
    if saved is not None:
        expected = {f"{KEY_PREFIX}{embedding}.{name}" for name in HMTLayer.saved_param_names(config)}
        expected |= {f"{KEY_PREFIX}{m}.{name}" for m in lora for name in HMTLoraLinear.saved_param_names(config)}
        if saved == expected:
            return
        saved_modules = {_module_of(k) for k in saved}
        odd = sorted(k for k in saved ^ expected if _module_of(k) in saved_modules and _module_of(k) in here)
        if odd:  # the modules fit, their parameters do not: the config was edited or the files were mixed
            raise ValueError(
                f"The adapter's weights and its adapter_config.json do not belong together ({_shown(odd)} in one and "
                f"not the other): save the adapter again, or restore the adapter_config.json it was saved with."
            )
        missing = sorted(set(here) - saved_modules)
        unexpected = sorted(saved_modules - set(here))
    elif config.base_embedding_dim is not None and isinstance(config.target_modules, (list, set, tuple)):
        missing = sorted(m for m in here if not any(_names_module(t, m) for t in config.target_modules))
        unexpected = sorted(t for t in config.target_modules if not any(_names_module(t, m) for m in here))
    else:
        return  # a new adapter: nothing saved to compare
    if not missing and not unexpected:
        return
    saved_for = (config.auto_mapping or {}).get("base_model_class") or "a backbone whose class was not recorded"
    if config.base_model_name_or_path:
        saved_for += f" ({config.base_model_name_or_path})"
    name = getattr(getattr(model, "config", None), "name_or_path", None) or ""
    loaded_onto = type(model).__name__ + (f" ({name})" if name else "")
    parts = ([f"saved weights of {_shown(unexpected)} have no module here"] if unexpected else []) + (
        [f"{_shown(missing)} would keep untrained weights"] if missing else [])
    raise ValueError(
        f"This HMT adapter was saved for {saved_for} but is being loaded onto {loaded_onto}, whose modules do not "
        f"match its weights: load it onto the backbone it was saved for ({'; '.join(parts)})."
    )


def _module_of(key: str) -> str:
    """The module path of a saved-adapter key: 'base_model.model.model.embed_tokens.hmt_memory_init' ->
    'model.embed_tokens'."""
    return key.removeprefix(KEY_PREFIX).split(ADAPTER_KEY_MARKER)[0]


def _shown(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def check_backbone(model: nn.Module, config: HMTConfig) -> None:
    """Check that ``config`` fits ``model``; raise `ValueError`/`TypeError` saying what to change."""
    check_causal_lm(model)
    width = input_embedding_width(model)
    out_width = output_hidden_width(model)
    if out_width != width:
        raise ValueError(
            f"HMT needs the backbone's last hidden state in its input-embedding space, but {type(model).__name__} "
            f"embeds tokens in {width} dims and its LM head reads {out_width} dims."
        )
    expected = getattr(config, "base_embedding_dim", None)
    if expected is not None and expected != width:
        raise ValueError(
            f"This HMT adapter was trained on a backbone with {expected}-dim input embeddings, but the model it is "
            f"being attached to ({type(model).__name__}, {getattr(model.config, 'name_or_path', None) or 'local'}) "
            f"has {width}-dim embeddings. Load it onto the backbone it was trained with "
            f"(adapter_config.json: base_model_name_or_path={config.base_model_name_or_path!r})."
        )
    limit = max_positions(model)
    need = max(config.positions_per_segment, config.summary_length + 2)
    if limit is not None and need > limit:
        raise ValueError(
            f"HMT segments need {need} positions (segment_length={config.segment_length} + num_sensory="
            f"{config.num_sensory} + 2 memory positions) but the backbone has max_position_embeddings={limit}. "
            f"Lower segment_length to at most {limit - config.num_sensory - 2}."
        )


class HMTModel(BaseTuner):
    """Hierarchical Memory Transformer adapter (see `HMTConfig` and docs/design.md).

    Attach it with ``peft.get_peft_model(model, HMTConfig(...))``. The forward reads inputs of any length:

    Input shape: ``input_ids`` (batch_size, seq_len), ``attention_mask`` (batch_size, seq_len), left or right
    padded; ``labels`` (batch_size, seq_len) with -100 for ignored tokens.
    Output: ``CausalLMOutputWithPast`` with ``loss`` (the causal-LM loss over every labelled token, across
    segment borders) and ``logits`` (batch_size, seq_len or logits_to_keep, vocab_size); or, with
    ``fused_lm_head=True``, an `HMTFusedOutput` of per-token log-probabilities and no logits.
    """

    prefix: str = HMT_PREFIX
    tuner_layer_cls = HMTTunerLayer
    target_module_mapping: dict[str, list[str]] = {}
    #: `hmt_adapter.engine.step.segment_step` wrapped by ``torch.compile`` (set by `hmt_adapter.compile`); None: eager.
    hmt_compiled_step: Optional[Callable[..., Any]] = None

    # ---- injection (PEFT's own `inject_adapter`, through its hooks) ---------------------------------------
    def _check_new_adapter_config(self, config: HMTConfig) -> None:
        """Check the config against the backbone: PEFT's first step of `inject_adapter`, before anything changes.

        `check_backbone` (a causal LM, the recorded width, positions); and a saved adapter (a config that records a
        backbone) whose weights would not all find their module here, or that would leave an HMT parameter of this
        backbone unloaded, raises `ValueError` naming both backbones (`_check_saved_adapter_fits`).
        """
        super()._check_new_adapter_config(config)
        if not isinstance(config, HMTConfig):
            raise TypeError(f"HMTModel needs an HMTConfig, got {type(config).__name__}.")
        check_backbone(self.model, config)
        lora = lora_target_names(self.model, config.lora_target_modules) if config.lora_r > 0 else []
        _check_saved_adapter_fits(self.model, config, self._input_embeddings_name(self.model), lora)

    def _prepare_adapter_config(self, peft_config: HMTConfig, model_config: dict) -> HMTConfig:
        """Resolve the modules this adapter wraps (checked in `_check_new_adapter_config`) before PEFT changes them.

        ``target_modules`` becomes the input-embedding module (HMT's parameters) plus, with ``lora_r > 0``, the
        modules ``lora_target_modules`` selects. ``base_embedding_dim`` records the backbone's embedding width and
        PEFT's ``auto_mapping`` its class.
        """
        embedding = self._input_embeddings_name(self.model)
        lora = lora_target_names(self.model, peft_config.lora_target_modules) if peft_config.lora_r > 0 else []
        peft_config.base_embedding_dim = input_embedding_width(self.model)
        peft_config.auto_mapping = {"base_model_class": type(self.model).__name__,
                                    "parent_library": type(self.model).__module__}
        peft_config.target_modules = [embedding, *lora]
        describe_backbone_for_card(peft_config, self.model)
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

    def _get_tied_target_modules(self, model: nn.Module) -> list[str]:
        # HMT wraps the (possibly tied) input embeddings only to hold its own parameters; it never changes the
        # embedding weights, so there is nothing to tie and PEFT's weight-tying warning does not apply.
        return []

    def _check_tied_modules(self, model: nn.Module, peft_config: HMTConfig) -> None:
        """PEFT's check for adapter targets tied to the input embeddings, without HMT's own embedding target.

        On reload the saved ``target_modules`` name the input embeddings, and PEFT warns on a tied backbone that "no
        implementation exists to tie the adapters". `HMTLayer` never changes the embedding weights (nor so the LM head
        tied to them): there is nothing to tie. LoRA's targets are still checked as PEFT checks any tuner's.
        """
        targets = peft_config.target_modules
        if not isinstance(targets, (list, set, tuple)):  # a fresh config: resolved later by _prepare_adapter_config
            super()._check_tied_modules(model, peft_config)
            return
        embedding = self._input_embeddings_name(model)
        others = copy.copy(peft_config)
        others.target_modules = [t for t in targets if not _names_module(t, embedding)]
        super()._check_tied_modules(model, others)

    @staticmethod
    def _input_embeddings_name(model: nn.Module) -> str:
        """The module path of ``model``'s input embeddings (PEFT's own lookup, as its ``trainable_tokens`` uses)."""
        name = _get_input_embeddings_name(model, None)
        if name is None:
            raise TypeError(f"Could not locate the input embeddings of {type(model).__name__} among its modules.")
        return name

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
        params = self.hmt_layer().params(self.active_adapters[0], config)
        return HMTRunner(Backbone(self.model), params, config)

    def hmt_enabled(self) -> bool:
        """Whether the HMT adapter runs: False when the model must behave as the bare backbone (adapters disabled,
        e.g. inside ``with model.disable_adapter():``, or no adapter active, e.g. after deleting the last one).

        `forward` and `generate` then pass straight to the backbone; `HMTStreamer` refuses to run.
        Raises `ValueError` when more than one adapter is active (HMT runs one at a time).
        """
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
        if not self.hmt_enabled():
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
        runner = self.runner()
        return hmt_forward(
            runner, input_ids, attention_mask, inputs_embeds, labels, shift_labels, fused_lm_head=fused_lm_head,
            logits_to_keep=logits_to_keep, num_items_in_batch=num_items_in_batch,
            checkpointing=self._checkpointing(runner.bb), step=self.hmt_compiled_step,
        )

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

    # ---- generation ---------------------------------------------------------------------------------------
    def generate(self, *args: Any, **kwargs: Any):
        """Memory-aware generation; see `hmt_adapter.inference.generation.generate`."""
        if not self.hmt_enabled():
            return self.model.generate(*args, **kwargs)
        return hmt_generate(self, *args, **kwargs)


