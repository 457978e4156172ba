"""What the engine reads of an adapter's config: a `Protocol`, so the engine depends on no layer above it.

`hmt_adapter.tuner.config.HMTConfig` satisfies it (the tuner builds every `HMTRunner` with one); the engine only
reads these fields.
"""

from __future__ import annotations

from typing import Literal, Optional, Protocol


class EngineSettings(Protocol):
    """The adapter settings the engine's computation depends on (see `HMTConfig` for their meaning)."""

    segment_length: int
    num_sensory: int
    use_recall: bool
    recall_query: Literal["segment", "previous"]
    recall_window: int
    bptt_depth: Optional[int]
    loss_scope: Literal["all", "last_segment"]

    @property
    def summary_length(self) -> int: ...

    @property
    def positions_per_segment(self) -> int: ...

    def stream_state_fields(self) -> tuple[str, ...]:
        """The fields a saved stream state records and checks."""
        ...
