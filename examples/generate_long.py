"""Answer a question about a long document with HMT memory-aware generation (offline, tiny untrained model).

    python examples/generate_long.py

The model is a randomly initialised tiny Llama with an untrained HMT adapter, so the answer is arbitrary
words: the point is the API. A 6,000-token document is read segment by segment through the memory (the
backbone itself only ever sees segment_length + num_sensory + 2 positions); the question at the end of the
prompt sits in the last segment, where recall_query="segment" uses it to pick the memories to recall.
"""

import random

import peft
import torch

from hmt_adapter import HMTConfig, testing

torch.manual_seed(0)
random.seed(0)
tokenizer = testing.tiny_tokenizer(padding_side="left", model_max_length=10**6)  # left-padded prompts
backbone = testing.tiny_causal_lm("llama")  # 512 positions, far fewer than the document
model = peft.get_peft_model(
    backbone, HMTConfig(task_type="CAUSAL_LM", segment_length=128, num_sensory=16, recall_dim=64)
).eval()

words = [w for w in testing.DEFAULT_WORDS if w.isalpha() and w not in ("user", "assistant", "system")]
document = " ".join(random.choice(words) for _ in range(6000)) + " . the king has a red book ."
questions = ["what does the king have ?", "who has a red book ?"]
prompts = [f"{document} user : {q} assistant :" for q in questions]

batch = tokenizer(prompts, return_tensors="pt", padding=True)
print(f"prompt lengths: {batch['attention_mask'].sum(1).tolist()} tokens")
out = model.generate(**batch, max_new_tokens=12, do_sample=True, top_p=0.9, temperature=0.8)
for q, row in zip(questions, out):
    answer = tokenizer.decode(row[batch["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"Q: {q}\nA (untrained model, arbitrary): {answer}")
