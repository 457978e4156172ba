"""Attach HMT to a causal LM, read an input far longer than its window, save the adapter and reload it.

    python examples/quickstart.py

Runs offline with a tiny Llama built locally; with the Hub, use any causal LM instead, e.g.
``AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM-135M")``.
"""

import tempfile

import peft
import torch

import hmt_adapter  # registers the "HMT" adapter type with PEFT
from hmt_adapter import HMTConfig, testing

base = testing.tiny_causal_lm("llama")  # max_position_embeddings=512
config = HMTConfig(task_type="CAUSAL_LM", segment_length=64, num_sensory=8, recall_dim=64)
model = peft.get_peft_model(base, config)
model.print_trainable_parameters()

ids = torch.randint(4, 128, (2, 2048))  # 32 segments: 4x the positions the backbone can take
out = model(input_ids=ids, labels=ids)
out.loss.backward()  # gradients reach only the HMT parameters
print(f"loss {out.loss.item():.3f}, logits {tuple(out.logits.shape)}")

with tempfile.TemporaryDirectory() as path:
    model.save_pretrained(path)  # adapter_config.json + adapter_model.safetensors
    reloaded = peft.PeftModel.from_pretrained(testing.tiny_causal_lm("llama"), path).eval()
    model.eval()
    with torch.no_grad():
        same = torch.equal(model(input_ids=ids[:, :300]).logits, reloaded(input_ids=ids[:, :300]).logits)
print(f"reloaded adapter gives identical logits: {same}; HMT version {hmt_adapter.__version__}")
