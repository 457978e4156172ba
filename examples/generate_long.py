"""Answer a question about a long document with HMT memory-aware generation (offline, tiny untrained model).

    python examples/generate_long.py

The model is a randomly initialised tiny Llama with an untrained HMT adapter, so the answer is arbitrary
words: the point is the API. A 6,000-token document is read segment by segment through the memory (the
backbone itself only ever sees segment_length + num_sensory + 2 positions); the question at the end of the
prompt sits in the last segment, where recall_query="segment" uses it to pick the memories to recall.
The same model answers through `model.generate` and through `pipeline("text-generation")`.
"""

import random

import peft
import torch
from transformers import pipeline

from hmt_adapter import HMTConfig, testing

#: transformers' own "no limit" for a tokenizer (``VERY_LARGE_INTEGER``; anything above 1e20 counts as none).
NO_LENGTH_LIMIT = int(1e30)


def load_tokenizer():
    """The tokenizer, its length limit lifted.

    A backbone's tokenizer carries the backbone's window as ``model_max_length`` and logs "Token indices sequence
    length is longer than the specified maximum sequence length for this model" when a prompt is longer, through
    `pipeline("text-generation")` too. HMT reads prompts of any length, so lift the limit: with a Hub model,
    ``AutoTokenizer.from_pretrained(name, model_max_length=int(1e30))``. The offline tokenizer here is built with
    a 512-token limit, the tiny backbone's window, and lifted the same way.
    """
    tokenizer = testing.tiny_tokenizer(padding_side="left", model_max_length=512)  # left-padded prompts
    tokenizer.model_max_length = NO_LENGTH_LIMIT
    return tokenizer


def load_model():
    """A tiny Llama (512 positions, far fewer than the document) with an untrained HMT adapter."""
    backbone = testing.tiny_causal_lm("llama")
    config = HMTConfig(task_type="CAUSAL_LM", segment_length=128, num_sensory=16, recall_dim=64)
    return peft.get_peft_model(backbone, config).eval()


def main() -> None:
    torch.manual_seed(0)
    random.seed(0)
    tokenizer, model = load_tokenizer(), load_model()

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

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    answer = generator(prompts[0], max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"]
    print(f"pipeline, Q: {questions[0]}\nA (untrained model, arbitrary): {answer}")


if __name__ == "__main__":
    main()
