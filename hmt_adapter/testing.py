"""Tiny, locally-built models and tokenizers for tests, the offline demo, examples and benchmarks.

Nothing in this module touches the Hugging Face Hub: every config, model and
tokenizer is constructed from hyper-parameters written out here.

Conventions shared by the tiny factories
----------------------------------------
* Special-token ids are identical for every tiny model and :func:`tiny_tokenizer`:
  ``<pad>`` = 0, ``<unk>`` = 1, ``<s>`` = 2 (bos), ``</s>`` = 3 (eos).
* All dropout probabilities default to ``0.0`` so that a model built by
  :func:`tiny_causal_lm` is deterministic even though it starts in *train* mode.
  Pass e.g. ``dropout=0.1`` (OPT) or ``resid_pdrop=0.1`` (GPT-2) to override.
* The attention implementation defaults to ``"sdpa"``; ``"eager"`` also works
  for every supported tiny architecture (pass ``attn_implementation="eager"``).

Notes on transformers 5.x behaviour relied on here
--------------------------------------------------
* Config constructors are keyword-only. ``rope_theta=...`` is still accepted but
  folded into ``config.rope_parameters`` (``config.rope_theta`` is then absent /
  ``None``); GPT-NeoX's ``rotary_pct`` lives in
  ``rope_parameters["partial_rotary_factor"]``.
* ``AutoModelForCausalLM.from_config`` honours ``config.dtype``; the tiny
  factories therefore pass ``dtype=torch.float32`` explicitly.
* ``from_config`` returns the model in **train** mode (``model.training is True``);
  only ``from_pretrained`` calls ``.eval()``.
* ``transformers.PreTrainedTokenizerFast`` is an alias of
  ``transformers.TokenizersBackend``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

__all__ = [
    "SUPPORTED_TINY_MODEL_TYPES",
    "TINY_VOCAB_SIZE",
    "PAD_TOKEN_ID",
    "UNK_TOKEN_ID",
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "SPECIAL_TOKENS",
    "DEFAULT_WORDS",
    "CHAT_TEMPLATE",
    "tiny_config",
    "tiny_causal_lm",
    "tiny_tokenizer",
]

#: Architectures :func:`tiny_config` / :func:`tiny_causal_lm` can build.
#: ``"opt-proj"`` is an OPT whose ``word_embed_proj_dim`` (32) differs from
#: ``hidden_size`` (64) and which uses post-LayerNorm, like OPT-350M, so that the
#: ``project_in`` / ``project_out`` code paths are exercised.
SUPPORTED_TINY_MODEL_TYPES: tuple[str, ...] = (
    "llama",
    "opt",
    "opt-proj",
    "qwen2",
    "mistral",
    "gpt2",
    "gpt_neox",
    "gemma2",
)

TINY_VOCAB_SIZE = 128
TINY_HIDDEN = 64
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_INTERMEDIATE = 128
TINY_MAX_POSITIONS = 512

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>")
PAD_TOKEN_ID, UNK_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2, 3

_TOKEN_IDS: dict[str, int] = {
    "pad_token_id": PAD_TOKEN_ID,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
}

# Per-architecture base kwargs (before the shared token ids / user overrides).
_TINY_BASE: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "llama",
        dict(
            hidden_size=TINY_HIDDEN,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            num_key_value_heads=TINY_KV_HEADS,
            intermediate_size=TINY_INTERMEDIATE,
            max_position_embeddings=TINY_MAX_POSITIONS,
            attention_dropout=0.0,
        ),
    ),
    "opt": (
        "opt",
        dict(
            hidden_size=TINY_HIDDEN,
            word_embed_proj_dim=TINY_HIDDEN,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            ffn_dim=TINY_INTERMEDIATE,
            max_position_embeddings=TINY_MAX_POSITIONS,
            enable_bias=True,
            do_layer_norm_before=True,
            dropout=0.0,
            attention_dropout=0.0,
            layerdrop=0.0,
        ),
    ),
    "opt-proj": (
        "opt",
        dict(
            hidden_size=TINY_HIDDEN,
            word_embed_proj_dim=TINY_HIDDEN // 2,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            ffn_dim=TINY_INTERMEDIATE,
            max_position_embeddings=TINY_MAX_POSITIONS,
            enable_bias=True,
            # OPT-350M is the only OPT with post-LN; with do_layer_norm_before=False
            # HF builds project_in/project_out and no final_layer_norm.
            do_layer_norm_before=False,
            dropout=0.0,
            attention_dropout=0.0,
            layerdrop=0.0,
        ),
    ),
    "qwen2": (
        "qwen2",
        dict(
            hidden_size=TINY_HIDDEN,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            num_key_value_heads=TINY_KV_HEADS,
            intermediate_size=TINY_INTERMEDIATE,
            max_position_embeddings=TINY_MAX_POSITIONS,
            attention_dropout=0.0,
        ),
    ),
    "mistral": (
        "mistral",
        dict(
            hidden_size=TINY_HIDDEN,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            num_key_value_heads=TINY_KV_HEADS,
            intermediate_size=TINY_INTERMEDIATE,
            max_position_embeddings=TINY_MAX_POSITIONS,
            attention_dropout=0.0,
        ),
    ),
    "gemma2": (  # final-logit softcapping (and attention softcapping): the LM-head paths must all apply it
        "gemma2",
        dict(
            hidden_size=TINY_HIDDEN,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            num_key_value_heads=TINY_KV_HEADS,
            head_dim=TINY_HIDDEN // TINY_HEADS,
            intermediate_size=TINY_INTERMEDIATE,
            max_position_embeddings=TINY_MAX_POSITIONS,
            attention_dropout=0.0,
            final_logit_softcapping=0.5,
            attn_implementation="eager",  # transformers has no sdpa path for Gemma-2's attention softcapping
        ),
    ),
    "gpt2": (
        "gpt2",
        dict(
            n_embd=TINY_HIDDEN,
            n_layer=TINY_LAYERS,
            n_head=TINY_HEADS,
            n_inner=TINY_INTERMEDIATE,
            n_positions=TINY_MAX_POSITIONS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        ),
    ),
    "gpt_neox": (
        "gpt_neox",
        dict(
            hidden_size=TINY_HIDDEN,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,  # GPT-NeoX has no GQA
            intermediate_size=TINY_INTERMEDIATE,
            max_position_embeddings=TINY_MAX_POSITIONS,
            attention_dropout=0.0,
            hidden_dropout=0.0,
        ),
    ),
}


def tiny_config(model_type: str = "llama", **overrides: Any) -> PretrainedConfig:
    """Build a tiny config for ``model_type`` (one of :data:`SUPPORTED_TINY_MODEL_TYPES`).

    Defaults: vocab 128, hidden 64, 2 layers, 4 heads (2 KV heads for llama,
    qwen2 and mistral), MLP width 128, 512 positions (``n_positions`` for GPT-2),
    all dropouts 0.0, ``attn_implementation="sdpa"``, ``dtype=float32`` and the
    token ids of :func:`tiny_tokenizer` (pad 0, bos 2, eos 3).

    OPT variants use ``enable_bias=True``. ``"opt"`` is pre-LN
    (``do_layer_norm_before=True``, ``word_embed_proj_dim == hidden_size``);
    ``"opt-proj"`` mimics OPT-350M: ``word_embed_proj_dim=32`` with
    ``hidden_size=64`` and post-LN (``do_layer_norm_before=False``).

    Any keyword in ``overrides`` is passed to the config constructor and wins over
    the defaults (e.g. ``vocab_size=256``, ``attn_implementation="eager"``).
    """
    if model_type not in _TINY_BASE:
        raise ValueError(
            f"Unknown tiny model_type {model_type!r}; expected one of {SUPPORTED_TINY_MODEL_TYPES}"
        )
    hf_type, base = _TINY_BASE[model_type]
    kwargs: dict[str, Any] = {
        "vocab_size": TINY_VOCAB_SIZE,
        "attn_implementation": "sdpa",
        **base,
        **_TOKEN_IDS,
        "dtype": "float32",
    }
    kwargs.update(overrides)
    return AutoConfig.for_model(hf_type, **kwargs)


def tiny_causal_lm(model_type: str = "llama", seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """Build a randomly initialised tiny causal LM (float32, CPU) from :func:`tiny_config`.

    ``torch.manual_seed(seed)`` is called right before construction, so the same
    ``(model_type, seed, overrides)`` always yields identical weights.

    The model is left in the mode ``AutoModelForCausalLM.from_config`` gives it,
    which in transformers 5.x is **train** mode (``model.training is True``);
    call ``.eval()`` yourself if needed. Dropouts are 0.0 by default so the
    forward pass is deterministic either way.
    """
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

#: Words of the default tiny vocabulary (special tokens come first, then these).
#: 4 special + 124 words = 128 = the default tiny ``vocab_size``.
DEFAULT_WORDS: tuple[str, ...] = (
    # punctuation the Whitespace pre-tokenizer splits off
    ".", ",", "!", "?", ":", ";", "'", "-", "(", ")",
    # digits
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
    # chat roles
    "system", "user", "assistant",
    # function words
    "the", "a", "an", "and", "or", "but", "of", "to", "in", "on", "at", "with",
    "is", "was", "are", "be", "it", "this", "that", "he", "she", "they", "we",
    "you", "i", "my", "your", "not", "no", "yes", "what", "who", "where",
    "when", "why", "how", "there", "here", "then", "so", "if", "for", "from",
    # nouns
    "cat", "dog", "bird", "fish", "tree", "house", "car", "book", "sun", "moon",
    "star", "water", "fire", "city", "road", "river", "king", "queen", "man",
    "woman", "child", "day", "night", "time", "year", "word", "name", "memory",
    "story", "world",
    # verbs
    "run", "runs", "see", "sees", "go", "goes", "say", "says", "eat", "eats",
    "read", "reads", "know", "knows", "remember", "forget",
    # adjectives
    "big", "small", "red", "blue", "green", "old", "new", "good", "bad", "happy",
    "fast", "slow",
)

#: Minimal chat template: one ``role: content`` line per message, each assistant
#: turn wrapped in ``{% generation %}`` (so ``return_assistant_tokens_mask`` /
#: TRL's ``assistant_only_loss`` work) and terminated by ``</s>``.
CHAT_TEMPLATE: str = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ message['role'] + ': ' }}"
    "{% generation %}{{ message['content'] + ' ' + eos_token }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{% else %}"
    "{{ message['role'] + ': ' + message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def tiny_tokenizer(
    vocab: list[str] | None = None,
    padding_side: str = "right",
    model_max_length: int = VERY_LARGE_INTEGER,
) -> PreTrainedTokenizerFast:
    """Build a word-level fast tokenizer entirely offline with the ``tokenizers`` library.

    The vocabulary is ``<pad>, <unk>, <s>, </s>`` (ids 0-3, matching the tiny model
    configs) followed by ``vocab`` (default :data:`DEFAULT_WORDS`, giving exactly
    128 tokens). Duplicates and words that collide with special tokens are dropped.
    Text is lower-cased, split with the ``Whitespace`` pre-tokenizer
    (``\\w+|[^\\w\\s]+``), unknown words map to ``<unk>``; no bos/eos is added
    automatically. A minimal :data:`CHAT_TEMPLATE` is attached. ``model_max_length``
    defaults to transformers' "no limit" (``VERY_LARGE_INTEGER``, ``int(1e30)``): HMT
    reads texts of any length, and a smaller limit only makes the tokenizer log
    "Token indices sequence length is longer than the specified maximum sequence
    length" (pass e.g. ``model_max_length=512`` to mimic a backbone's window). With a custom
    ``vocab`` longer than 124 words, build the model with a matching
    ``vocab_size`` (``len(tokenizer)``).

    The result round-trips through ``save_pretrained(dir)`` /
    ``AutoTokenizer.from_pretrained(dir)`` without network access.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    words = list(DEFAULT_WORDS) if vocab is None else list(vocab)
    token_to_id: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        if word not in token_to_id:
            token_to_id[word] = len(token_to_id)

    backend = Tokenizer(models.WordLevel(vocab=token_to_id, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side=padding_side,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
