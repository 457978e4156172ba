"""Checks on a saved adapter's files, run before anything is attached to a model.

PEFT loads the adapter config first (``HMTConfig.from_pretrained``) and the weights only after the tuner has
been injected, so a corrupt weights file would otherwise fail half-way through, with the model already changed.
"""

from __future__ import annotations

import os
from typing import Optional

from peft.utils import SAFETENSORS_WEIGHTS_NAME

from ._peft_shim import HMT_PREFIX

KEY_PREFIX = "base_model.model."
#: A saved HMT key names a module path, then an HMT parameter: '...embed_tokens.hmt_memory_init'.
ADAPTER_KEY_MARKER = "." + HMT_PREFIX
LORA_KEY_MARKER = ADAPTER_KEY_MARKER + "lora_"


def check_adapter_weights(directory: str, embedding_dim: Optional[int]) -> Optional[frozenset[str]]:
    """Fully read ``directory/adapter_model.safetensors`` (if present) and check its keys and widths.

    Returns the file's keys (None when there is no such file), which the tuner compares with the keys the adapter
    will have on the backbone it is loaded onto. Raises `ValueError` naming the file when it cannot be read (corrupt
    or truncated), when a key is not an HMT/LoRA adapter weight, or when an HMT tensor's last dimension is not
    ``embedding_dim`` (scalars, like the memory gate, have none).
    """
    path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    if not os.path.isfile(path):
        return None
    from safetensors.torch import load_file

    try:
        tensors = load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error types (and OSError) for damaged files
        raise ValueError(
            f"Could not read the adapter weights {path!r} ({type(exc).__name__}: {exc}). The file is corrupt or "
            f"truncated: save the adapter again or re-download it."
        ) from None
    for key, tensor in tensors.items():
        if not key.startswith(KEY_PREFIX) or ADAPTER_KEY_MARKER not in key:
            raise ValueError(
                f"{path!r} holds {key!r}, which is not an HMT adapter weight (expected keys starting with "
                f"{KEY_PREFIX!r} and containing {ADAPTER_KEY_MARKER!r}; HMT's LoRA weights are '{LORA_KEY_MARKER}A/B'). "
                f"Point to a directory written by save_pretrained of an HMT adapter."
            )
        if embedding_dim is not None and LORA_KEY_MARKER not in key and tensor.dim() and tensor.shape[-1] != embedding_dim:
            raise ValueError(
                f"{path!r}: {key!r} has shape {tuple(tensor.shape)}, but adapter_config.json says "
                f"base_embedding_dim={embedding_dim}. The files do not belong together: save the adapter again."
            )
    return frozenset(tensors)
