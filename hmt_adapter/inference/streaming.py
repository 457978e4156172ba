"""Streaming inference with HMT: feed an unbounded input in chunks and keep the memory between calls.

```py
streamer = HMTStreamer(peft_model)
state = streamer.init_state(batch_size=1)
for chunk in chunks:                       # (B, c) token ids, any c >= 1
    logits, state = streamer.feed(chunk, state)
logits_tail, state = streamer.finish(state)
save_state(state, "session.safetensors")   # resume later with load_state("session.safetensors", peft_model)
```

Concatenating the logits returned by every `feed` and by `finish` gives, within float tolerance, the logits of
ONE forward pass over the whole input, whatever the chunk sizes. Memory use does not grow with the input: the state
holds the current segment (at most ``segment_length`` tokens and their KV cache) and at most ``recall_window``
memory embeddings.

Held-back logits (``recall_query="segment"``): the memory a segment reads is recalled with a query computed from the
segment's first ``summary_length`` tokens, so the logits of a segment's early tokens are not known before those
tokens have arrived. They are held back and returned by the `feed` that completes the query window (or by
`finish`, which fixes the query with the tokens known at that time, exactly as the forward does for a short last
segment). With ``recall_query="previous"`` or ``use_recall=False`` every token's logits are returned by the `feed`
that brought it. Feeding after `finish` goes on with the query `finish` fixed (this is what generation does).

`feed` and `finish` are the engine's stream operations (`hmt_adapter.engine.stream`: `run_segment` for a segment
that arrives whole, exactly as in the forward; the same `SegmentLayout` on the backbone's KV cache for one that
arrives in pieces).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import torch
from torch import nn

from ..engine import HMTRunner, HMTStreamState, MemoryCache, MemoryState, config_header, feed, finish, open_stream

STATE_FORMAT = "hmt-stream-state"
STATE_VERSION = 1


# ---- public API ----------------------------------------------------------------------------------------------
def _is_hmt_tuner(model: Any) -> bool:
    """An `HMTModel` (checked by what it offers, so this module needs not import the tuner)."""
    return callable(getattr(model, "runner", None)) and callable(getattr(model, "hmt_layer", None))


def _hmt_model(model: nn.Module):
    if isinstance(model, HMTStreamer):
        return model.hmt_model
    for candidate in (model, getattr(model, "base_model", None)):
        if _is_hmt_tuner(candidate):
            return candidate
    raise TypeError(
        f"Expected a PEFT model with an HMT adapter (peft.get_peft_model(model, HMTConfig(...))) or an HMTModel, "
        f"got {type(model).__name__}."
    )


class HMTStreamer:
    """Feeds a stream of token chunks through an HMT model, one `HMTStreamState` per stream.

    Args:
        model: a ``PeftModelForCausalLM`` carrying an HMT adapter, or its `HMTModel` (``peft_model.base_model``).

    The streamer holds no state of its own: every call takes a state and returns the advanced one (the same
    object, updated in place). Everything runs under ``torch.no_grad()``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.hmt_model = _hmt_model(model)

    def _runner(self) -> HMTRunner:
        if not self.hmt_model.hmt_enabled():
            raise ValueError("The HMT adapter is disabled; streaming needs it enabled (leave `disable_adapter()`).")
        return self.hmt_model.runner()

    @property
    def device(self) -> torch.device:
        return self.hmt_model.hmt_layer().base_layer.weight.device

    def init_state(self, batch_size: int = 1) -> HMTStreamState:
        """A fresh stream for ``batch_size`` rows (rows advance together: feed them chunks of equal length)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        return open_stream(self._runner(), batch_size, self.device)

    def _check(self, ids: torch.Tensor, state: HMTStreamState) -> None:
        if not isinstance(state, HMTStreamState):
            raise TypeError(f"state must be an HMTStreamState (from init_state or load_state), got {type(state).__name__}.")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError("input_ids must be an integer tensor of shape (batch_size, chunk_length).")
        if state.config != config_header(self.hmt_model.hmt_config):
            raise ValueError("This stream state belongs to an HMT adapter of another config; use the adapter it was built with.")
        if ids.shape[0] != state.batch_size:
            raise ValueError(f"The chunk has {ids.shape[0]} rows but the stream state has {state.batch_size}.")

    @torch.no_grad()
    def feed(
        self, input_ids: torch.Tensor, state: HMTStreamState, return_logits: bool = True
    ) -> tuple[Optional[torch.Tensor], HMTStreamState]:
        """Feed a chunk of (B, c) token ids (no padding; c >= 0).

        Returns:
            logits (B, r, V) of the r tokens released by this call (r = c unless tokens are held back, see the
            module docstring), or None with ``return_logits=False``; and the advanced state.
        """
        self._check(input_ids, state)
        runner = self._runner()
        ids = input_ids.to(state.pending.device).long()
        hidden = feed(runner, state, ids, "all" if return_logits else "none")
        return (self._logits(runner, hidden, state) if return_logits else None), state

    @torch.no_grad()
    def finish(self, state: HMTStreamState, return_logits: bool = True) -> tuple[Optional[torch.Tensor], HMTStreamState]:
        """End of input: fix the open segment's recall query with the tokens it has and release held-back logits.

        Returns the logits (B, r, V) of the held-back tokens (r = 0 when none) and the state.
        """
        if not isinstance(state, HMTStreamState):
            raise TypeError(f"state must be an HMTStreamState, got {type(state).__name__}.")
        runner = self._runner()
        hidden = finish(runner, state, "all" if return_logits else "none")
        return (self._logits(runner, hidden, state) if return_logits else None), state

    @staticmethod
    def _logits(runner: HMTRunner, hidden: list[torch.Tensor], state: HMTStreamState) -> torch.Tensor:
        if not hidden:
            vocab = runner.bb.head.weight.shape[0]
            return state.carry.sensory.new_zeros(state.batch_size, 0, vocab)
        return runner.bb.logits(torch.cat(hidden, dim=1))


# ---- saving and loading ----------------------------------------------------------------------------------------
def save_state(state: HMTStreamState, path: str) -> None:
    """Write ``state`` to ``path``: its tensors as safetensors, the adapter config it belongs to in a JSON header.

    The KV cache of the open segment is not written: it is rebuilt from the pending tokens when the stream goes on.
    """
    from safetensors.torch import save_file

    if not isinstance(state, HMTStreamState):
        raise TypeError(f"save_state needs an HMTStreamState, got {type(state).__name__}.")
    tensors = {"pending": state.pending, "sensory": state.carry.sensory}
    if state.memory is not None:
        tensors["memory"] = state.memory
    if state.carry.last_memory is not None:
        tensors["last_memory"] = state.carry.last_memory
    if len(state.cache):
        tensors["cache_values"] = torch.stack(state.cache.values)  # (N, B, d)
        tensors["cache_segments"] = torch.tensor(state.cache.segment, dtype=torch.long)
        if state.cache.keys[0] is not None:
            tensors["cache_keys"] = torch.stack(state.cache.keys)  # (N, B, h)
    header = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "config": state.config,
        "segment": state.segment,
        "released": state.released if state.memory is not None else 0,
        "tokens_seen": state.tokens_seen,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}  # allowed: written to a file
    save_file(tensors, str(path), metadata={"hmt_stream_state": json.dumps(header)})


def load_state(path: str, model: nn.Module) -> HMTStreamState:
    """Read a state written by `save_state` for ``model`` (a PEFT model with an HMT adapter, HMTModel or HMTStreamer).

    Raises `ValueError` if the file is not an HMT stream state or was written for an adapter of another config.
    Tensors go to the device of the model's embeddings.
    """
    from safetensors import safe_open

    hmt_model = _hmt_model(model)
    config = hmt_model.hmt_config
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, RuntimeError) as err:  # safetensors raises SafetensorError (a subclass) on bad files
        raise ValueError(f"Could not read an HMT stream state from {path!r}: {err}") from err
    except Exception as err:  # noqa: BLE001  (safetensors' own error type is not importable everywhere)
        raise ValueError(f"Could not read an HMT stream state from {path!r}: {err}") from err
    if "hmt_stream_state" not in meta:
        raise ValueError(f"{path!r} is a safetensors file but not an HMT stream state (written by save_state).")
    header = json.loads(meta["hmt_stream_state"])
    if header.get("format") != STATE_FORMAT or header.get("version") != STATE_VERSION:
        raise ValueError(f"{path!r} holds an unsupported stream-state format {header.get('format')!r} v{header.get('version')}.")
    saved, current = header["config"], config_header(config)
    diff = {k: (saved.get(k), current[k]) for k in current if saved.get(k) != current[k]}
    if diff:
        details = ", ".join(f"{k}: saved {a!r} vs adapter {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"The stream state in {path!r} was written by an HMT adapter of another config ({details}). Load it into "
            f"the adapter it was saved from."
        )
    layer = hmt_model.hmt_layer()
    device, embed_dtype = layer.base_layer.weight.device, layer.base_layer.weight.dtype
    param_dtype = layer.hmt_memory_init[hmt_model.active_adapters[0]].dtype
    for name in ("pending", "sensory"):
        if name not in tensors:
            raise ValueError(f"{path!r} is missing the tensor {name!r}; it is not a complete HMT stream state.")
    cache = MemoryCache(window=config.recall_window)
    if "cache_values" in tensors:
        values = tensors["cache_values"].to(device=device, dtype=param_dtype)
        keys = tensors.get("cache_keys")
        for i, seg in enumerate(tensors["cache_segments"].tolist()):
            key = None if keys is None else keys[i].to(device=device, dtype=param_dtype)
            cache.append(values[i], key, int(seg))

    def opt(name: str) -> Optional[torch.Tensor]:
        return tensors[name].to(device=device, dtype=param_dtype) if name in tensors else None

    carry = MemoryState(
        segment=int(header["segment"]),
        sensory=tensors["sensory"].to(device=device, dtype=embed_dtype),
        last_memory=opt("last_memory"),
        cache=cache,
    )
    return HMTStreamState(
        carry=carry,
        pending=tensors["pending"].to(device=device, dtype=torch.long),
        memory=opt("memory"),
        tokens_seen=int(header.get("tokens_seen", 0)),
        config=current,
        released=int(header.get("released", 0)),
    )


__all__ = ["HMTStreamState", "HMTStreamer", "save_state", "load_state"]
