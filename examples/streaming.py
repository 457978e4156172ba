"""Stream an unbounded token source through HMT in chunks, save the session, resume it later (offline).

    python examples/streaming.py

A tiny untrained Llama + HMT adapter reads 20,000 tokens arriving in chunks of 700 (any size works: the logits
are those of one forward over the whole input). Memory use stays flat: the state holds one open segment and at
most recall_window memory embeddings. Halfway, the state is saved to a safetensors file and loaded back.
"""

import os
import tempfile

import peft
import torch

from hmt_adapter import HMTConfig, testing
from hmt_adapter.inference.streaming import HMTStreamer, load_state, save_state

torch.manual_seed(0)
model = peft.get_peft_model(
    testing.tiny_causal_lm("llama"),
    HMTConfig(task_type="CAUSAL_LM", segment_length=128, num_sensory=16, recall_window=64, recall_dim=64),
).eval()
streamer = HMTStreamer(model)
source = torch.randint(4, testing.TINY_VOCAB_SIZE, (1, 20_000))  # stands in for a live token stream
state = streamer.init_state(batch_size=1)
nll, scored = 0.0, 0
path = os.path.join(tempfile.mkdtemp(), "session.safetensors")

for start in range(0, source.shape[1], 700):
    chunk = source[:, start : start + 700]
    logits, state = streamer.feed(chunk, state)  # logits of the tokens released by this chunk
    targets = source[:, scored + 1 : scored + 1 + logits.shape[1]]
    nll -= logits[:, : targets.shape[1]].log_softmax(-1).gather(-1, targets.unsqueeze(-1)).sum().item()
    scored += logits.shape[1]
    if start == 9_800:
        save_state(state, path)  # e.g. the service restarts here
        state = load_state(path, model)
        print(f"saved and reloaded the state after {state.tokens_seen} tokens ({os.path.getsize(path)} bytes)")

tail, state = streamer.finish(state)  # releases logits held back for the open segment's recall query
print(f"read {state.tokens_seen} tokens in {state.segment} full segments + {state.position_in_segment} pending;"
      f" {len(state.cache)} memories cached; mean NLL {nll / (scored - 1):.3f} (untrained: ~ln(128) = 4.85)")
