"""HMT's one segment engine: the token layout, the recall-query rule, and the segment step.

- `layout`: `SegmentLayout` (``[m ; sensory ; x ; m]`` written once, read back by its mirror) and the recall-query
  window rule (`summary_window_start`, `query_known`).
- `runner`: `HMTRunner` (summary pass, memory read, segment pass, memory write) and the explicit `MemoryState`.
- `incremental`: the same step fed token by token with a KV cache (`HMTStreamState`, `feed_tokens`, `flush`),
  used by streaming and generation.
- `ragged`: several lock-step groups at different positions in their segments, decoded in ONE backbone call per
  token on one masked KV cache (`RaggedStreams`), used by generation.

The full forward (`hmt_adapter.forward`), streaming and generation are callers of this package; it imports none
of them.
"""

from .incremental import HMTStreamState, config_header, feed_tokens, flush, new_state
from .layout import SegmentLayout, query_known, summary_window_start
from .ragged import RaggedStreams
from .runner import HMTRunner, MemoryState

__all__ = [
    "HMTRunner",
    "HMTStreamState",
    "MemoryState",
    "RaggedStreams",
    "SegmentLayout",
    "config_header",
    "feed_tokens",
    "flush",
    "new_state",
    "query_known",
    "summary_window_start",
]
