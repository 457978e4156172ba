"""Sharded training of an HMT model with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

HMT calls the backbone once per segment (plus one batched summary pass) inside a training step, optionally with
each segment checkpointed; FSDP2 gathers a layer's weights around each of those calls and reduces the gradients
once in backward, so the step computes what one process computes on the same global batch.

    model = peft.get_peft_model(base, HMTConfig(...))
    shard_model(model)                                  # every decoder layer, then the whole model
    ... train as usual (loss.backward(), optimizer.step()) ...
    save_adapter(model, "out")                          # the adapter only, gathered on rank 0

`tests/test_fsdp.py` runs this with two CPU processes over gloo against one process on the same batch. On GPUs,
accelerate's FSDP plugin (``fsdp_version: 2``) wraps the same way; see recipes/accelerate-fsdp.yaml.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..tuner.weights import ADAPTER_KEY_MARKER


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The backbone's repeated blocks: modules whose class is in transformers' ``_no_split_modules``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"Could not find the decoder layers of {type(base).__name__} (no _no_split_modules).")
    return layers


def shard_model(model: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """Apply FSDP2 to every decoder layer and then to the whole (PEFT) model; returns ``model`` (sharded in place).

    ``fsdp_kwargs`` go to ``fully_shard`` (e.g. ``mesh=``, ``mp_policy=``). Needs an initialised process group.
    """
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return model


def gather_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's full (unsharded) weights, on the CPU of rank 0 (an empty dict on other ranks).

    A collective: every rank must call it. Keys are those of the model's own state dict (PEFT's
    ``save_pretrained(state_dict=...)`` selects and renames the adapter's entries).
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return {}
    return {k: v for k, v in full.items() if ADAPTER_KEY_MARKER in k}


def save_adapter(model: Any, directory: str, **save_kwargs: Any) -> None:
    """Gather the adapter on rank 0 and write it with PEFT's ``save_pretrained`` there (a collective)."""
    import torch.distributed as dist

    state = gather_adapter_state_dict(model)
    if dist.get_rank() == 0:
        model.save_pretrained(directory, state_dict=state, **save_kwargs)
    dist.barrier()
