"""Test fixtures: the published configs of real checkpoints (built locally) and a tiny HMT model with strong
memory weights. Not part of the library: tests import them from here.
"""

from __future__ import annotations

from typing import Any

import peft
import torch
from transformers import LlamaConfig, OPTConfig, PretrainedConfig

from hmt_adapter import HMTConfig
from hmt_adapter.testing import tiny_causal_lm

#: Parameter counts of ``AutoModelForCausalLM.from_config(real_config(name))``
#: measured on the meta device with transformers 5.23 (tied embeddings counted once).
REAL_PARAM_COUNTS: dict[str, int] = {
    "facebook/opt-350m": 331_196_416,
    "facebook/opt-2.7b": 2_651_596_800,
    "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "HuggingFaceTB/SmolLM-135M": 134_515_008,
}

REAL_CONFIG_NAMES: tuple[str, ...] = tuple(REAL_PARAM_COUNTS)


def _opt(**kw: Any) -> OPTConfig:
    base: dict[str, Any] = dict(
        vocab_size=50272,
        max_position_embeddings=2048,
        activation_function="relu",
        dropout=0.1,
        attention_dropout=0.0,
        layerdrop=0.0,
        init_std=0.02,
        enable_bias=True,
        layer_norm_elementwise_affine=True,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        tie_word_embeddings=True,
        use_cache=True,
        dtype="float16",
        architectures=["OPTForCausalLM"],
    )
    base.update(kw)
    return OPTConfig(**base)


def _llama(**kw: Any) -> LlamaConfig:
    base: dict[str, Any] = dict(
        hidden_act="silu",
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        pretraining_tp=1,
        pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=False,
        architectures=["LlamaForCausalLM"],
    )
    base.update(kw)
    return LlamaConfig(**base)


def real_config(name: str) -> PretrainedConfig:
    """Return the published config of a real checkpoint, built locally (no download).

    ``name`` is one of :data:`REAL_CONFIG_NAMES` (the short form after ``/`` is
    also accepted, case-insensitively). ``dtype`` is set to the checkpoint's
    published ``torch_dtype`` and ``from_config`` honours it.

    ===========================  ======  =====  ======  =====  ======  ======  =====  ===============
    name                         hidden  layers heads   kv     ffn     vocab   pos    params (meta)
    ===========================  ======  =====  ======  =====  ======  ======  =====  ===============
    facebook/opt-350m            1024*   24     16      16     4096    50272   2048   331,196,416
    facebook/opt-2.7b            2560    32     32      32     10240   50272   2048   2,651,596,800
    meta-llama/Llama-2-7b-hf     4096    32     32      32     11008   32000   4096   6,738,415,616
    HuggingFaceTB/SmolLM-135M    576     30     9       3      1536    49152   2048   134,515,008
    ===========================  ======  =====  ======  =====  ======  ======  =====  ===============

    ``*`` OPT-350M: ``word_embed_proj_dim=512`` (embeddings/LM head are 512-wide,
    with ``project_in``/``project_out`` 512<->1024) and ``do_layer_norm_before=False``.
    OPT models tie the LM head to the embeddings; Llama-2 does not; SmolLM does
    (``tie_word_embeddings=True``). Llama-2: ``rms_norm_eps=1e-5``, rope_theta 1e4;
    SmolLM: ``rms_norm_eps=1e-5``, rope_theta 1e4, bos = eos = 0.
    Parameter counts are with tied weights counted once.
    """
    key = _resolve_real_name(name)
    if key == "facebook/opt-350m":
        return _opt(
            hidden_size=1024,
            word_embed_proj_dim=512,
            num_hidden_layers=24,
            num_attention_heads=16,
            ffn_dim=4096,
            do_layer_norm_before=False,
        )
    if key == "facebook/opt-2.7b":
        return _opt(
            hidden_size=2560,
            word_embed_proj_dim=2560,
            num_hidden_layers=32,
            num_attention_heads=32,
            ffn_dim=10240,
            do_layer_norm_before=True,
        )
    if key == "meta-llama/Llama-2-7b-hf":
        return _llama(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
            dtype="float16",
        )
    if key == "HuggingFaceTB/SmolLM-135M":
        return _llama(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=2048,
            bos_token_id=0,
            eos_token_id=0,
            tie_word_embeddings=True,
            dtype="float32",
        )
    raise AssertionError("unreachable")  # pragma: no cover


def _resolve_real_name(name: str) -> str:
    lowered = name.lower()
    for full in REAL_CONFIG_NAMES:
        if lowered in (full.lower(), full.split("/", 1)[1].lower()):
            return full
    raise ValueError(f"Unknown real config {name!r}; expected one of {REAL_CONFIG_NAMES}")


def perturbed_hmt_model(segment_length: int = 8, recall_query: str = "segment", seed: int = 1, **overrides: Any):
    """Tiny Llama + HMT (eval mode) whose recall and memory-projection weights are scaled up.

    At init HMT's recall is nearly uniform and the projection is the identity, so memory barely moves the
    logits; tests that must see memory and the recall query matter (streaming, generation) use this.
    """
    kwargs: dict[str, Any] = dict(segment_length=segment_length, num_sensory=3, recall_dim=16, recall_query=recall_query)
    kwargs.update(overrides)
    model = peft.get_peft_model(tiny_causal_lm("llama"), HMTConfig(task_type="CAUSAL_LM", **kwargs)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "hmt_recall" in name:
                param.copy_(torch.randn(param.shape, generator=gen))
            elif "hmt_memory_proj" in name:
                param.add_(0.5 * torch.randn(param.shape, generator=gen))
            elif "hmt_write_token" in name:  # far from m_0, so using the wrong one shows
                param.copy_(torch.randn(param.shape, generator=gen))
            elif "hmt_memory_gate" in name:  # open (zero at init would hide every recall)
                param.fill_(0.8)
    return model
