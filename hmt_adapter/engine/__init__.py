"""HMT's one segment engine: the token layout, the recall-query rule, and the segment step.

- `layout`: `SegmentLayout` (``[m ; sensory ; x ; w]`` written once, read back by its mirror) and the recall-query
  window rule (`summary_window_start`, `query_known`).
- `runner`: `HMTRunner` (summary pass, memory read, segment pass, memory write) and the explicit `MemoryState`.
- `step`: `segment_step`, the forward's whole per-segment work in one tensor-only function (what
  `hmt_adapter.compile` wraps in ``torch.compile``).
- `incremental`: the same step fed token by token with a KV cache (`HMTStreamState`, `feed_tokens`, `flush`),
  used by streaming and generation.
- `ragged`: several lock-step groups at different positions in their segments, decoded in ONE backbone call per
  token on one masked KV cache (`RaggedStreams`), used by generation.

The full forward (`hmt_adapter.engine.forward`), streaming and generation are callers of this package; it imports none
of them.
"""

from .stream import HMTStreamState, config_header, feed_tokens, flush, new_state
from .layout import SegmentLayout, query_known, summary_window_start
from .ragged import RaggedStreams
from .runner import HMTRunner, MemorySource, MemoryState
from .step import HeadRequest, StepOutput, segment_step

__all__ = [
    "HMTRunner",
    "HeadRequest",
    "MemorySource",
    "HMTStreamState",
    "MemoryState",
    "RaggedStreams",
    "SegmentLayout",
    "StepOutput",
    "config_header",
    "feed_tokens",
    "flush",
    "new_state",
    "query_known",
    "segment_step",
    "summary_window_start",
]
