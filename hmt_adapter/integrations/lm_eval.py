"""HMT in lm-evaluation-harness: the model ``hmt``. ``import hmt_adapter.integrations.lm_eval`` registers it; an installed
hmt-adapter also registers it whenever lm-eval loads its registry (`_hmt_adapter_autoload`), so lm-eval's own
``lm_eval --model hmt ...`` works too.

``hmt`` is lm-eval's `HFLM` with the same ``model_args`` (``pretrained=BASE,peft=ADAPTER_DIR,dtype=...``; batch size
and device as lm-eval's own flags) that loads an HMT adapter and never truncates a context: `HFLM` cuts every context
to the backbone's
``max_position_embeddings``, which for an HMT model silently throws away exactly the text the memory is for. Every
context of any length goes through HMT whole, for ``loglikelihood``, ``loglikelihood_rolling`` (one window: the
whole document) and ``generate_until`` (HMT's memory-aware ``generate``).

    hmt-adapter lm-eval --model hmt --model_args pretrained=BASE,peft=ADAPTER --batch_size 4 --tasks ... [--include_path DIR]

In Python, a built model can be passed directly: ``HMTLM(pretrained=peft_model, tokenizer=tokenizer)``.

Exact log-likelihoods: with ``recall_query="previous"`` HMT is strictly causal, so the score of a continuation is
the adapter's forward over context + continuation, whatever the split between them and whatever else shares the
batch (lm-eval right-pads batches without an attention mask; padding after a row's tokens cannot reach them). With
``recall_query="segment"`` (the paper's) a segment's memory is chosen with its own first tokens, so padding inside
a row's last segment would change the scores: `HMTLM` then scores each request alone (``batch_size`` applies to
generation only), and the numbers still depend on where the task splits context and continuation.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'hmt_adapter.integrations.lm_eval needs lm-evaluation-harness: pip install "hmt-adapter[eval]" (lm-eval>=0.4.13).'
    ) from exc

from peft import PeftModel
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from ..tuner.config import HMTConfig

#: The context length HMT accepts: no limit (a Python int far beyond any document).
UNBOUNDED_LENGTH = 1 << 40


def hmt_config_of(model: Any) -> HMTConfig:
    """The active `HMTConfig` of a PEFT model; `ValueError` when the model carries no HMT adapter."""
    if not isinstance(model, PeftModel):
        raise ValueError(
            f"The 'hmt' lm-eval model needs an HMT adapter: pass model_args 'pretrained=BASE,peft=ADAPTER_DIR' (or a "
            f"PeftModel with an HMT adapter as pretrained=), got a {type(model).__name__} without one."
        )
    config = model.peft_config[model.active_adapter]
    if not isinstance(config, HMTConfig):
        raise ValueError(
            f"The adapter loaded for the 'hmt' lm-eval model is {config.peft_type}, not HMT; use lm-eval's 'hf' model "
            f"for other PEFT adapters."
        )
    return config


class EncodingCache:
    """Mixin for lm-eval's `HFLM`: remember the last encodings of long strings.

    lm-eval scores a ``multiple_choice`` document as one request per choice and encodes the (same) context again for
    each; with contexts of 16k-64k tokens that tokenization costs more than HMT's pass over them. Encodings of strings
    of at least ``min_chars`` characters are kept (the last ``size`` of them); results are identical to
    `HFLM.tok_encode` (a copy of the cached list is returned).
    """

    encoding_cache_size = 64
    encoding_cache_min_chars = 2048

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        if kwargs or len(string) < self.encoding_cache_min_chars:
            return super().tok_encode(string, add_special_tokens=add_special_tokens,
                                      left_truncate_len=left_truncate_len, **kwargs)
        cache = self.__dict__.setdefault("_encoding_cache", OrderedDict())
        key = (string, add_special_tokens, left_truncate_len)
        if key in cache:
            cache.move_to_end(key)
        else:
            cache[key] = super().tok_encode(string, add_special_tokens=add_special_tokens,
                                            left_truncate_len=left_truncate_len)
            if len(cache) > self.encoding_cache_size:
                cache.popitem(last=False)
        return list(cache[key])


@register_model("hmt")
class HMTLM(EncodingCache, HFLM):
    """lm-eval's `HFLM` for a backbone + HMT adapter: contexts of any length, never truncated.

    Args: as `HFLM` (``pretrained``, ``peft``, ``tokenizer``, ``batch_size``, ``dtype``, ``device``, ...), except
    that ``max_length`` is refused (HMT has no context limit) and ``batch_size="auto"`` is refused (its probe
    allocates a batch of ``max_length`` tokens). Long contexts are tokenized once for all their choices
    (`EncodingCache`). The tokenizer's ``model_max_length`` is set to transformers' "no limit" (``int(1e30)``), so
    long contexts do not log "Token indices sequence length is longer than the specified maximum sequence length".
    """

    def __init__(self, pretrained: Any, peft: str | None = None, max_length: int | None = None,
                 batch_size: int | str = 1, **kwargs: Any) -> None:
        if max_length is not None:
            raise ValueError("The 'hmt' lm-eval model reads contexts of any length: remove max_length from model_args.")
        if str(batch_size).startswith("auto"):
            raise ValueError("The 'hmt' lm-eval model needs an integer batch_size (batch_size='auto' probes max_length).")
        if isinstance(pretrained, str) and not peft:
            raise ValueError("The 'hmt' lm-eval model needs an HMT adapter: model_args 'pretrained=BASE,peft=ADAPTER_DIR'.")
        super().__init__(pretrained=pretrained, peft=peft, batch_size=batch_size, **kwargs)
        self.hmt_config = hmt_config_of(self.model)
        self.tokenizer.model_max_length = VERY_LARGE_INTEGER  # contexts of any length: no length warning

    @property
    def max_length(self) -> int:
        return UNBOUNDED_LENGTH

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        if self.hmt_config.recall_query == "segment" and self.hmt_config.use_recall:
            override_bs = 1  # padding inside a row's last segment would enter that segment's recall query
        return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)


__all__ = ["EncodingCache", "HMTLM", "UNBOUNDED_LENGTH", "hmt_config_of"]
