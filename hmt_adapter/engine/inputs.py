"""Input checking and the per-row token layout of a batch: real tokens first, segments counted on them.

A row padded on the left or the right must give the same result as the row alone, so padding is removed
before segmentation: each row's real tokens are moved to the front ("compacted"), segment borders are
counted on them, and per-token results are moved back to the row's original positions at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """A batch with each row's real tokens moved to the front.

    embeds: (B, T, d) token embeddings, compacted; positions >= lengths[b] hold padding.
    lengths: (B,) real tokens per row.
    order: (B, T) original position of each compact position (a permutation of 0..T-1 per row),
        or None when there is no padding.
    next_labels: (B, T) compact next-token label of each compact position (IGNORE_INDEX where there is
        none), or None without labels.
    """

    embeds: torch.Tensor
    lengths: torch.Tensor
    order: Optional[torch.Tensor]
    next_labels: Optional[torch.Tensor]

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]

    @property
    def total_length(self) -> int:
        return self.embeds.shape[1]

    def to_original(self, compact: torch.Tensor) -> torch.Tensor:
        """Move a per-position tensor (B, T, ...) from the compact layout back to the original positions."""
        if self.order is None:
            return compact
        index = self.order.view(*self.order.shape, *([1] * (compact.dim() - 2))).expand_as(compact)
        return torch.zeros_like(compact).scatter(1, index, compact)


def _check_2d(name: str, tensor: torch.Tensor, shape: Optional[torch.Size] = None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}.")
    if tensor.dim() != 2:
        raise ValueError(f"`{name}` must have shape (batch_size, sequence_length), got {tuple(tensor.shape)}.")
    if shape is not None and tensor.shape != shape:
        raise ValueError(
            f"`{name}` has shape {tuple(tensor.shape)} but input_ids has shape {tuple(shape)}; they must match."
        )


def check_inputs(
    input_ids: Optional[torch.Tensor],
    inputs_embeds: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
) -> tuple[int, int]:
    """Validate the shapes and values of a forward call; returns (batch_size, sequence_length)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
    if input_ids is not None:
        _check_2d("input_ids", input_ids)
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"`input_ids` must hold integer token ids (torch.long), got {input_ids.dtype}.")
        shape = input_ids.shape
    else:
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
            raise ValueError("`inputs_embeds` must be a tensor of shape (batch_size, sequence_length, embedding_dim).")
        shape = inputs_embeds.shape[:2]
    batch, length = int(shape[0]), int(shape[1])
    if batch == 0:
        raise ValueError("The batch is empty (batch_size 0): pass at least one sequence.")
    if length == 0:
        raise ValueError("The input has zero length: pass at least one token per sequence.")
    if attention_mask is not None:
        _check_2d("attention_mask", attention_mask, torch.Size(shape))
        if attention_mask.dtype.is_floating_point and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("`attention_mask` must hold only 0 (padding) and 1 (real token).")
        if not attention_mask.dtype.is_floating_point and attention_mask.dtype != torch.bool:
            if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                raise ValueError("`attention_mask` must hold only 0 (padding) and 1 (real token).")
        empty = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"Rows {empty} of the batch have no real tokens (their attention_mask is all 0).")
    if labels is not None:
        _check_2d("labels", labels, torch.Size(shape))
    return batch, length


def pack_batch(
    embed: Callable[[torch.Tensor], torch.Tensor],
    input_ids: Optional[torch.Tensor],
    inputs_embeds: Optional[torch.Tensor],
    attention_mask: Optional[torch.Tensor],
    labels: Optional[torch.Tensor] = None,
    shift_labels: Optional[torch.Tensor] = None,
) -> PackedBatch:
    """Embed and compact a (checked) batch.

    ``labels`` are Hugging Face labels (shifted here, across the whole row); ``shift_labels`` are labels
    already shifted by the caller (``shift_labels[:, t]`` is the target of position t).
    """
    embeds = embed(input_ids) if inputs_embeds is None else inputs_embeds
    batch, length = embeds.shape[:2]
    device = embeds.device
    if attention_mask is None or bool(attention_mask.bool().all()):
        lengths = torch.full((batch,), length, dtype=torch.long, device=device)
        order = None
    else:
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1).long()
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # real tokens first, in order
        embeds = embeds.gather(1, order.unsqueeze(-1).expand_as(embeds))
    next_labels = None
    target = labels if labels is not None else shift_labels
    if target is not None:
        target = target.to(device)
        if order is not None:
            target = target.gather(1, order)
        if labels is not None:  # shift once over the whole row
            target = torch.cat([target[:, 1:], target.new_full((batch, 1), IGNORE_INDEX)], dim=1)
        positions = torch.arange(length, device=device).unsqueeze(0)
        last_real = lengths.unsqueeze(1) - (1 if labels is not None else 0)
        next_labels = target.masked_fill(positions >= last_real, IGNORE_INDEX)
    return PackedBatch(embeds=embeds, lengths=lengths, order=order, next_labels=next_labels)
