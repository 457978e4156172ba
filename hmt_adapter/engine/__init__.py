"""HMT's engine: every computation of the adapter, and nothing else (it imports no other part of the package).

- `layout`: `SegmentLayout` (``[m ; sensory ; x ; w]`` written once, read back by its mirror) and the recall-query
  window rule (`summary_window_start`, `query_known`).
- `backbone`: the decoder stack, embeddings and LM head of a transformers causal LM (HMT never calls the causal
  LM's own forward); `lm_head`: the chunked LM-head log-prob kernel; `inputs`: input checks and padding compaction.
- `memory`: memory projection, the long-term cache, recall (`read_memory`: the one way memory is read).
- `settings`: `EngineSettings`, the config fields the engine reads (a `Protocol` `HMTConfig` satisfies).
- `runner`: `HMTRunner` (summary pass and `recall_queries`, memory source, segment pass, memory write) and the
  explicit `MemoryState`.
- `step`: `segment_step`, a segment's whole work in one tensor-only function (what `hmt_adapter.compile` wraps),
  and `run_segment`, the read / step / write every whole segment goes through.
- `forward`: the whole-batch forward (`hmt_forward`).
- `stream`: the stream state fed token by token (`open_stream`, `feed`, `finish`), what streaming and generation run.
- `ragged`: lock-step groups of rows at different positions in their segments, decoded in ONE backbone call per
  token on one masked KV cache (`RaggedStreams`), over the stream's `close_segment` / `read_memory`.
"""

from .backbone import Backbone, check_causal_lm, input_embedding_width, max_positions, output_hidden_width
from .forward import HMTFusedOutput, hmt_forward
from .inputs import check_inputs
from .layout import SegmentLayout, query_known, summary_window_start
from .memory import HMTParams, MemoryCache, observe_recall
from .ragged import RaggedStreams
from .runner import HMTRunner, MemorySource, MemoryState
from .settings import EngineSettings
from .step import HeadRequest, StepOutput, run_segment, segment_step
from .stream import HMTStreamState, close_segment, config_header, feed, finish, open_stream, read_memory

__all__ = [
    "Backbone",
    "check_causal_lm",
    "check_inputs",
    "close_segment",
    "config_header",
    "feed",
    "finish",
    "HeadRequest",
    "hmt_forward",
    "EngineSettings",
    "HMTFusedOutput",
    "HMTParams",
    "HMTRunner",
    "HMTStreamState",
    "input_embedding_width",
    "max_positions",
    "MemoryCache",
    "MemorySource",
    "MemoryState",
    "observe_recall",
    "open_stream",
    "output_hidden_width",
    "query_known",
    "RaggedStreams",
    "read_memory",
    "run_segment",
    "segment_step",
    "SegmentLayout",
    "StepOutput",
    "summary_window_start",
]
