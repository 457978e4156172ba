"""Running an attached HMT adapter: `generate` (greedy, sampling, beams; generation.py, beam_search.py) and
streaming (`HMTStreamer`, `save_state`, `load_state`; streaming.py), all over the engine's stream state."""

from .streaming import HMTStreamer, HMTStreamState, load_state, save_state

__all__ = ["HMTStreamState", "HMTStreamer", "load_state", "save_state"]
