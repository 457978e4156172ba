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

Every segment step goes through `HMTRunner` (``segment_pass`` for a segment that arrives whole,
``segment_prefix`` / ``extend`` / ``write_slot`` for one that arrives in pieces).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from .config import HMTConfig
from .memory import MemoryCache
from .recurrence import HMTRunner

STATE_FORMAT = "hmt-stream-state"
STATE_VERSION = 1
#: Config fields a saved state depends on; loading into an adapter that differs in any of them is an error.
STATE_CONFIG_FIELDS = (
    "segment_length",
    "num_sensory",
    "recall_window",
    "recall_dim",
    "summary_fraction",
    "memory_projection",
    "recall_query",
    "use_recall",
    "base_embedding_dim",
)


@dataclass
class HMTStreamState:
    """Everything HMT carries between chunks of a stream, for B rows that advance in lock-step.

    Attributes:
        segment: index n of the open segment (0-based).
        pending: (B, t) int64 token ids of segment n received so far, 0 <= t < segment_length.
        sensory: (B, k, d) sensory memory of segment n (embeddings of the last k <= num_sensory tokens before it),
            in the backbone's embedding dtype.
        memory: (B, d) memory embedding m_n read by segment n, in the adapter's dtype; None while its recall query
            is not fixed yet (``recall_query="segment"`` before ``summary_length`` tokens of segment n arrived).
        last_memory: (B, d) memory embedding e_{n-1} written by the previous segment (None for n == 0).
        cache: long-term memory, the last ``recall_window`` memory embeddings and their recall keys.
        tokens_seen: tokens fed so far (all segments).
        kv: the backbone's KV cache over ``[m_n ; sensory ; pending[:, :kv_tokens]]`` (derived: not saved, rebuilt
            from ``pending`` when needed).
        kv_tokens: pending tokens whose logits were returned (all of them are in ``kv`` when ``kv`` is set);
            tokens in ``pending`` beyond it are held back.
        config: the adapter config fields the state depends on (`STATE_CONFIG_FIELDS`), checked on use and load.
    """

    segment: int
    pending: torch.Tensor
    sensory: torch.Tensor
    memory: Optional[torch.Tensor]
    last_memory: Optional[torch.Tensor]
    cache: MemoryCache
    tokens_seen: int = 0
    config: dict = field(default_factory=dict)
    kv: Any = field(default=None, repr=False)
    kv_tokens: int = 0

    @property
    def batch_size(self) -> int:
        return self.pending.shape[0]

    @property
    def position_in_segment(self) -> int:
        """Tokens of the open segment received so far (t)."""
        return self.pending.shape[1]

    @property
    def held_back(self) -> int:
        """Tokens fed whose logits have not been returned yet (see the module docstring)."""
        return self.pending.shape[1] - self.kv_tokens if self.memory is not None else self.pending.shape[1]


# ---- the engine (shared with generation) ---------------------------------------------------------------------
def new_state(runner: HMTRunner, batch_size: int, device: torch.device) -> HMTStreamState:
    """An empty stream: segment 0, reading the learned initial memory m_0."""
    d = runner.bb.embeddings.weight.shape[1]
    dtype = runner.bb.embed_dtype
    return HMTStreamState(
        segment=0,
        pending=torch.zeros(batch_size, 0, dtype=torch.long, device=device),
        sensory=torch.zeros(batch_size, 0, d, dtype=dtype, device=device),
        memory=runner.initial_memory(batch_size),
        last_memory=None,
        cache=runner.new_cache(),
        config=_config_header(runner.config),
    )


def _recall_tokens(runner: HMTRunner, ids: torch.Tensor) -> torch.Tensor:
    """One summary pass for the (B, t) query window ``ids`` (t may be 0): (B, d) queries."""
    tokens = runner.bb.embed(ids)
    lengths = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
    return runner.summary_queries(tokens, lengths)


def _fix_memory(runner: HMTRunner, state: HMTStreamState, window: torch.Tensor) -> None:
    """Read m_n for the open segment with the recall query of ``window`` (B, t) token ids."""
    query = None
    if runner.config.use_recall and len(state.cache) > 0:
        query = _recall_tokens(runner, window)
    state.memory, _ = runner.read_memory(state.segment, query, state.cache, state.last_memory, state.batch_size)


def _close(runner: HMTRunner, state: HMTStreamState, x_ids: torch.Tensor, e_raw: torch.Tensor) -> None:
    """Segment n is complete (x_ids: its (B, L) tokens): write its memory, carry sensory, open segment n + 1."""
    cfg = runner.config
    n = state.segment
    state.last_memory = runner.write_memory(e_raw, state.cache, n)
    state.sensory = runner.next_sensory(state.sensory, runner.bb.embed(x_ids), n)
    state.segment = n + 1
    state.pending = x_ids[:, :0]
    state.kv, state.kv_tokens = None, 0
    state.memory = None
    if not cfg.use_recall or cfg.recall_query == "previous":  # the query is known now: the end of x_n
        _fix_memory(runner, state, x_ids[:, x_ids.shape[1] - cfg.summary_length :])


def _run_pending(runner: HMTRunner, state: HMTStreamState) -> torch.Tensor:
    """Run the pending tokens not yet in the KV cache (memory must be fixed): their hidden states (B, r, d)."""
    start = state.kv_tokens
    if state.kv is None:  # a new segment, or a loaded state (whose first `start` tokens were returned before)
        embeds = runner.segment_prefix(state.memory, state.sensory, runner.bb.embed(state.pending))
        hidden, state.kv = runner.extend(embeds, None, 0)
        state.kv_tokens = state.pending.shape[1]
        return hidden[:, 1 + state.sensory.shape[1] + start :]
    new = runner.bb.embed(state.pending[:, start:])
    if new.shape[1]:
        hidden, state.kv = runner.extend(new, state.kv, 1 + state.sensory.shape[1] + start)
    else:
        hidden = new
    state.kv_tokens = state.pending.shape[1]
    return hidden


def _keep(hidden: torch.Tensor, keep: str) -> Optional[torch.Tensor]:
    if keep == "all" or hidden.shape[1] == 0:
        return hidden
    return hidden[:, -1:] if keep == "last" else None


def feed_tokens(runner: HMTRunner, state: HMTStreamState, ids: torch.Tensor, keep: str = "all") -> list[torch.Tensor]:
    """Advance ``state`` (in place) by the (B, c) token ids ``ids``.

    Returns the last-layer hidden states of the tokens released by this call, as a list of (B, r_i, d) pieces in
    order (``keep="all"``); only the piece ending at the last released token (``"last"``), or nothing (``"none"``).
    """
    cfg = runner.config
    seg_len, width = cfg.segment_length, cfg.summary_length
    out: list[torch.Tensor] = []
    pos, total = 0, ids.shape[1]
    while pos < total:
        t = state.pending.shape[1]
        take = min(seg_len - t, total - pos)
        new = ids[:, pos : pos + take]
        pos += take
        state.tokens_seen += take
        if t == 0 and take == seg_len and state.kv is None:  # a whole segment: one segment_pass, as in forward
            if state.memory is None:
                _fix_memory(runner, state, new[:, :width])
            x = runner.bb.embed(new)
            x_len = torch.full((x.shape[0],), seg_len, dtype=torch.long, device=x.device)
            hidden, e_raw = runner.segment_pass(state.memory, state.sensory, x, x_len)
            piece = _keep(hidden, keep)
            _close(runner, state, new, e_raw)
        else:
            state.pending = torch.cat([state.pending, new], dim=1)
            if state.memory is None and state.pending.shape[1] >= width:
                _fix_memory(runner, state, state.pending[:, :width])
            piece = None
            if state.memory is not None:
                piece = _keep(_run_pending(runner, state), keep)
                if state.pending.shape[1] == seg_len:
                    slot = runner.write_slot(state.memory, state.sensory)
                    e_hidden, _ = runner.extend(slot, state.kv, 1 + state.sensory.shape[1] + seg_len)
                    _close(runner, state, state.pending, e_hidden[:, 0])
        if piece is not None and piece.shape[1]:
            if keep == "last":
                out[:] = [piece]
            else:
                out.append(piece)
    return out


def flush(runner: HMTRunner, state: HMTStreamState, keep: str = "all") -> list[torch.Tensor]:
    """Fix the open segment's query with the tokens known now (``[s ; s]`` if none) and release held tokens."""
    if state.memory is None:
        _fix_memory(runner, state, state.pending[:, : runner.config.summary_length])
    if state.kv is None and state.pending.shape[1] == 0:
        return []
    hidden = _run_pending(runner, state)
    piece = _keep(hidden, keep)
    return [] if piece is None or piece.shape[1] == 0 else [piece]


# ---- public API ----------------------------------------------------------------------------------------------
def _hmt_model(model: nn.Module):
    from .model import HMTModel

    if isinstance(model, HMTStreamer):
        return model.hmt_model
    if isinstance(model, HMTModel):
        return model
    base = getattr(model, "base_model", None)
    if isinstance(base, HMTModel):
        return base
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
        if not self.hmt_model._adapter_enabled():
            raise ValueError("The HMT adapter is disabled; streaming needs it enabled (leave `disable_adapter()`).")
        return self.hmt_model.runner()

    @property
    def device(self) -> torch.device:
        return self.hmt_model.hmt_layer().base_layer.weight.device

    def init_state(self, batch_size: int = 1) -> HMTStreamState:
        """A fresh stream for ``batch_size`` rows (rows advance together: feed them chunks of equal length)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}.")
        return new_state(self._runner(), batch_size, self.device)

    def _check(self, ids: torch.Tensor, state: HMTStreamState) -> None:
        if not isinstance(state, HMTStreamState):
            raise TypeError(f"state must be an HMTStreamState (from init_state or load_state), got {type(state).__name__}.")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError("input_ids must be an integer tensor of shape (batch_size, chunk_length).")
        if state.config != _config_header(self.hmt_model.hmt_config):
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
        hidden = feed_tokens(runner, state, ids, "all" if return_logits else "none")
        return (self._logits(runner, hidden, state) if return_logits else None), state

    @torch.no_grad()
    def finish(self, state: HMTStreamState, return_logits: bool = True) -> tuple[Optional[torch.Tensor], HMTStreamState]:
        """End of input: fix the open segment's recall query with the tokens it has and release held-back logits.

        Returns the logits (B, r, V) of the held-back tokens (r = 0 when none) and the state.
        """
        if not isinstance(state, HMTStreamState):
            raise TypeError(f"state must be an HMTStreamState, got {type(state).__name__}.")
        runner = self._runner()
        hidden = flush(runner, state, "all" if return_logits else "none")
        return (self._logits(runner, hidden, state) if return_logits else None), state

    @staticmethod
    def _logits(runner: HMTRunner, hidden: list[torch.Tensor], state: HMTStreamState) -> torch.Tensor:
        if not hidden:
            vocab = runner.bb.head.weight.shape[0]
            return state.sensory.new_zeros(state.batch_size, 0, vocab)
        return runner.bb.logits(torch.cat(hidden, dim=1))


# ---- saving and loading ----------------------------------------------------------------------------------------
def _config_header(config: HMTConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in STATE_CONFIG_FIELDS}


def save_state(state: HMTStreamState, path: str) -> None:
    """Write ``state`` to ``path``: its tensors as safetensors, the adapter config it belongs to in a JSON header.

    The KV cache of the open segment is not written: it is rebuilt from the pending tokens when the stream goes on.
    """
    from safetensors.torch import save_file

    if not isinstance(state, HMTStreamState):
        raise TypeError(f"save_state needs an HMTStreamState, got {type(state).__name__}.")
    tensors = {"pending": state.pending, "sensory": state.sensory}
    if state.memory is not None:
        tensors["memory"] = state.memory
    if state.last_memory is not None:
        tensors["last_memory"] = state.last_memory
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
        "released": state.kv_tokens if state.memory is not None else 0,
        "tokens_seen": state.tokens_seen,
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
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
    saved, current = header["config"], _config_header(config)
    diff = {k: (saved.get(k), current[k]) for k in STATE_CONFIG_FIELDS if saved.get(k) != current[k]}
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

    return HMTStreamState(
        segment=int(header["segment"]),
        pending=tensors["pending"].to(device=device, dtype=torch.long),
        sensory=tensors["sensory"].to(device=device, dtype=embed_dtype),
        memory=opt("memory"),
        last_memory=opt("last_memory"),
        cache=cache,
        tokens_seen=int(header.get("tokens_seen", 0)),
        config=current,
        kv_tokens=int(header.get("released", 0)),
    )


__all__ = ["HMTStreamState", "HMTStreamer", "save_state", "load_state"]
