"""Where everything sits in a segment pass, and which tokens make a segment's recall query.

The token layout of segment n is written here once (`SegmentLayout.pack`) and read back by its mirror
(`SegmentLayout.unpack`); the KV-cached pieces of the same layout (`prefix`, `write_slot`, `token_position`,
`write_position`) used by streaming and generation come from the same object, so no caller computes an offset.

    position: 0     1 .. k       k+1 .. k+l     k+l+1
    content:  m_n   sensory_n    x_n            w_n  (write position: its hidden state becomes e_n)

``w_n`` is ``m_n`` again (the paper's layout, ``write_token="memory"``) or a learned write token
(``write_token="learned"``); `HMTRunner.write_input` decides which.

The summary pass that makes a recall query uses the same framing with the summary token s:
``[s ; window ; s]``, read at the last position (`frame` / `read_after`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from .settings import EngineSettings


Index = Union[int, torch.Tensor]


def frame(first: torch.Tensor, body: torch.Tensor, body_len: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Lay out ``[first ; body[:body_len] ; last ; (junk)]`` per row.

    Args:
        first: (B, d) embedding at position 0.
        body: (B, l, d) embeddings, right-padded per row.
        body_len: (B,) real length of each row's body.
        last: (B, d) embedding written right after each row's real body, at position ``1 + body_len``.

    Returns:
        (B, l + 2, d). Positions after ``1 + body_len`` hold padding that no earlier position attends to.
    """
    b, l, d = body.shape
    out = torch.cat([first.unsqueeze(1), body, body.new_zeros(b, 1, d)], dim=1)  # (B, l + 2, d)
    pos = torch.arange(l + 2, device=body.device)
    at_last = (pos.unsqueeze(0) == (body_len + 1).unsqueeze(1)).unsqueeze(-1)  # (B, l + 2, 1)
    return torch.where(at_last, last.unsqueeze(1), out)


def read_after(hidden: torch.Tensor, body_len: torch.Tensor) -> torch.Tensor:
    """The mirror of `frame`'s ``last`` slot: hidden (B, l + 2, d) at position ``1 + body_len`` -> (B, d)."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, body_len + 1]


@dataclass(frozen=True)
class SegmentLayout:
    """The layout ``[m ; sensory ; x ; w]`` of one segment pass with ``num_sensory`` sensory tokens (k).

    k is the pass's actual sensory length (0 for segment 0, up to ``HMTConfig.num_sensory`` after): build it with
    `SegmentLayout.of(sensory)`.
    """

    num_sensory: int

    @classmethod
    def of(cls, sensory: torch.Tensor) -> "SegmentLayout":
        """The layout of a pass whose sensory embeddings are ``sensory`` (B, k, d)."""
        return cls(int(sensory.shape[1]))

    def token_position(self, t: Index) -> Index:
        """Position of the segment's token t (0-based)."""
        return 1 + self.num_sensory + t

    def write_position(self, x_len: Index) -> Index:
        """Position of the write slot after ``x_len`` real tokens."""
        return 1 + self.num_sensory + x_len

    def pack(
        self, memory: torch.Tensor, sensory: torch.Tensor, x: torch.Tensor, x_len: torch.Tensor, write: torch.Tensor
    ) -> torch.Tensor:
        """Embeddings of a whole segment pass.

        Args:
            memory: (B, d) memory embedding m_n (cast to ``x``'s dtype).
            write: (B, d) embedding at the write position (m_n itself, or the learned write token).
            sensory: (B, k, d) sensory embeddings (k = ``num_sensory``).
            x: (B, l, d) segment token embeddings, right-padded per row; x_len: (B,) real tokens per row.

        Returns:
            (B, 1 + k' + l + 1, d).
        """
        if sensory.shape[1] != self.num_sensory:
            raise ValueError(f"SegmentLayout for {self.num_sensory} sensory tokens got {sensory.shape[1]}.")
        return frame(memory.to(x.dtype), torch.cat([sensory, x], dim=1), x_len + self.num_sensory, write.to(x.dtype))

    def unpack(self, hidden: torch.Tensor, x_len: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The mirror of `pack`: hidden (B, 1 + k + l + 1, d) -> hidden states of x (B, l, d) and of the write
        slot (B, d); ``width`` = l."""
        start = self.token_position(0)
        return hidden[:, start : start + width], read_after(hidden, x_len + self.num_sensory)

    @staticmethod
    def prefix(memory: torch.Tensor, sensory: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The first positions of `pack`'s layout, ``[m ; sensory ; x]`` (B, 1 + k + t, d), for cached decoding."""
        return torch.cat([memory.to(x.dtype).unsqueeze(1), sensory, x], dim=1)

    @staticmethod
    def write_slot(write: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The write slot ``[w]`` of `pack`'s layout from its (B, d) embedding: (B, 1, d) in ``like``'s dtype."""
        return write.to(like.dtype).unsqueeze(1)


def summary_window_start(config: EngineSettings, segment_start: Index) -> Index:
    """The recall-query rule: first token of segment n's summary window, in the caller's token coordinates.

    ``recall_query="segment"`` (the paper's): the segment's own first ``summary_length`` tokens (fewer in a short
    last segment). ``"previous"``: the ``summary_length`` tokens before the segment (strictly causal).
    ``segment_start`` is where segment n starts (int or tensor); the window is ``[start, start + summary_length)``.
    """
    if config.recall_query == "previous":
        return segment_start - config.summary_length
    return segment_start


def query_known(config: EngineSettings, tokens_in_segment: int) -> bool:
    """Whether segment n's memory can be read once ``tokens_in_segment`` of its tokens are known (streaming and
    generation): at once without recall or with ``"previous"``; after ``summary_length`` tokens with ``"segment"``."""
    return not config.use_recall or config.recall_query == "previous" or tokens_in_segment >= config.summary_length
