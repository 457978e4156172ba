"""Access to the parts of a Hugging Face causal LM that HMT drives: decoder stack, embeddings, LM head.

HMT never calls the causal LM's own `forward` (TRL patches it, and it would build (B, T, V) logits);
it runs the decoder stack (`model.base_model`) on input embeddings and applies the LM head itself.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn



def _is_causal_lm_class(cls: type) -> bool:
    """True for ``*ForCausalLM`` classes and the causal LMs transformers names otherwise (GPT2LMHeadModel, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if cls.__name__.endswith("ForCausalLM"):
        return True
    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        if cls.__name__ in ((names,) if isinstance(names, str) else tuple(names)):
            return True
    return False


def check_causal_lm(model: nn.Module) -> None:
    """Raise `TypeError` unless ``model`` is a Hugging Face causal LM HMT can drive."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"HMT adapts Hugging Face causal LMs (a transformers PreTrainedModel such as LlamaForCausalLM), "
            f"got {type(model).__name__}."
        )
    decoder = model.base_model
    head = model.get_output_embeddings()
    if decoder is model or head is None or not _is_causal_lm_class(type(model)):
        raise TypeError(
            f"HMT needs a causal LM with a language-modelling head (AutoModelForCausalLM), got "
            f"{type(model).__name__}. Load the model with AutoModelForCausalLM.from_pretrained(...)."
        )


class Backbone:
    """A view on a causal LM: its decoder stack, input embeddings and LM head.

    Args:
        model: a transformers ``*ForCausalLM`` (possibly with PEFT layers injected).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.decoder = model.base_model
        self.head = model.get_output_embeddings()
        cfg = model.config.get_text_config()
        self.final_logit_softcapping = getattr(cfg, "final_logit_softcapping", None)
        scale = getattr(cfg, "logit_scale", None)
        self.logit_scale = 1.0 if scale is None else float(scale)

    @property
    def embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def embed_dtype(self) -> torch.dtype:
        return self.embeddings.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)

    def run(
        self,
        inputs_embeds: torch.Tensor,
        past_key_values=None,
        use_cache: bool = False,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ):
        """Run the decoder stack on (B, P, d) embeddings; returns the model output (``last_hidden_state`` etc.).

        Positions default to 0..P-1 (each segment restarts at 0); with no attention mask the pass is plainly
        causal, which is all a right-padded segment needs.
        """
        kwargs = {"inputs_embeds": inputs_embeds, "use_cache": use_cache, "return_dict": True}
        if past_key_values is not None:
            kwargs["past_key_values"] = past_key_values
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        return self.decoder(**kwargs)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits for hidden states (..., d) -> (..., V), with the model's logit scaling if any."""
        logits = self.head(hidden)
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    @property
    def is_gradient_checkpointing(self) -> bool:
        flag = getattr(type(self.model), "is_activation_checkpointing", None)
        if flag is None:  # transformers < 5.x name
            return bool(getattr(self.model, "is_gradient_checkpointing", False))
        return bool(self.model.is_activation_checkpointing)

    @contextlib.contextmanager
    def layer_checkpointing_off(self) -> Iterator[None]:
        """Turn off transformers' per-layer checkpointing while HMT checkpoints whole segments (no double recompute)."""
        layers = [m for m in self.decoder.modules() if getattr(m, "gradient_checkpointing", False) is True]
        for m in layers:
            m.gradient_checkpointing = False
        try:
            yield
        finally:
            for m in layers:
                m.gradient_checkpointing = True


def input_embedding_width(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[1])


def output_hidden_width(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None:
        raise TypeError(f"{type(model).__name__}'s LM head has no weight; HMT cannot drive it.")
    # bitsandbytes 4-bit heads keep the logical shape in `out_features`/`in_features`
    return int(getattr(head, "in_features", weight.shape[-1]))


def max_positions(model: nn.Module) -> Optional[int]:
    cfg = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
