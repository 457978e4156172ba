"""`hmt_adapter.compile`: run HMT's segment step through ``torch.compile``.

Compiling the whole model (``torch.compile(peft_model)``) splits HMT's forward into dozens of graphs at the
per-segment Python glue (segment counts, cache bookkeeping, index building). What is worth compiling is the
segment step itself (`hmt_adapter.engine.step.segment_step`: recall, layout, backbone pass, memory write, loss or
log-probs), which the forward runs once per segment with the same shapes. `compile` wraps exactly that function;
the eager forward runs the same function unwrapped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine import segment_step
from .model import HMTModel


def _tuner(model: nn.Module) -> HMTModel:
    tuner = model if isinstance(model, HMTModel) else getattr(model, "base_model", None)
    if not isinstance(tuner, HMTModel):
        raise TypeError(
            f"hmt_adapter.compile needs a model with an HMT adapter (peft.get_peft_model(base, HMTConfig(...))), "
            f"got {type(model).__name__}."
        )
    return tuner


def compile(model: nn.Module, enabled: bool = True, **options: Any) -> nn.Module:  # noqa: A001 (torch.compile's name)
    """Compile the HMT segment step of ``model`` (a PeftModel or HMTModel with an HMT adapter); returns ``model``.

    The model is changed in place and stays the same object (its state dict, saving and PEFT operations are
    untouched). The first forward of each kind compiles; later ones reuse the graphs:

    * one graph for segment 0 (no sensory tokens, reads m_0) and one for every later segment: the short last
      segment is padded to ``segment_length`` and the length of the growing memory cache is marked dynamic, so
      neither recompiles per call (with recall, segment 1, whose cache holds one entry, gets a graph of its own);
    * a new set per kind of call: training / no-grad, fused LM head / logits, with / without labels, another
      batch size. ``torch._dynamo.config.recompile_limit`` (8 by default) caps the graphs of one function in a
      process; past it the step runs eagerly (correct, not faster).

    A compiled step runs the LM head on every position of a segment (padding and ignored labels included, under a
    mask) instead of gathering the scored ones: the same results, more head work when many labels are -100.

    Args:
        model: the model with an HMT adapter.
        enabled: False turns compilation off again (the eager step).
        **options: passed to ``torch.compile`` (``backend``, ``mode``, ``fullgraph``, ``dynamic``, ...).
    """
    tuner = _tuner(model)
    tuner.hmt_compiled_step = torch.compile(segment_step, **options) if enabled else None
    return model
