"""The benchmarks' backbones: random tiny Llamas built from a config (nothing is downloaded), and HMT on them.

* Speed and memory benchmarks time random weights (throughput and memory do not depend on the weights' values):
  `build_backbone` for a `Size`, `inference_model` for the tiny model of the inference benchmarks.
* The quality and retrieval benchmarks pretrain a `tiny_backbone` of their settings' shape (`benchmarks.lab.pretrain`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import peft
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

from hmt_adapter import HMTConfig


@dataclass(frozen=True)
class Size:
    """A tiny-Llama size: hidden width and depth (vocab 32000 so the LM head costs what a real one does)."""

    name: str
    hidden: int
    layers: int
    vocab: int = 32000

    @property
    def heads(self) -> int:
        return max(1, self.hidden // 64)

    @property
    def intermediate(self) -> int:
        return (self.hidden * 8 // 3 + 63) // 64 * 64


SIZES = {"h256-l4": Size("h256-l4", 256, 4), "h512-l8": Size("h512-l8", 512, 8)}


def parse_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def llama(
    vocab: int, hidden: int, layers: int, heads: int, intermediate: int, max_positions: int, tie: bool,
    dtype: torch.dtype = torch.float32, seed: int = 0, **config: Any,
):
    """The one backbone builder of the benchmarks: a random Llama causal LM from a config (sdpa attention)."""
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
        tie_word_embeddings=tie, attn_implementation="sdpa", **config,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def build_backbone(
    size: Size, device: str = "cpu", dtype: torch.dtype = torch.float32, four_bit: bool = False, max_positions: int = 8192
):
    """A frozen random Llama causal LM of ``size`` on ``device`` (optionally loaded as a 4-bit nf4 model)."""
    model = llama(size.vocab, size.hidden, size.layers, size.heads, size.intermediate, max_positions, False, dtype)
    if four_bit:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
            model = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=dtype, device_map=device)
    else:
        model = model.to(device)
    model.requires_grad_(False)
    return model.eval()


def attach_hmt(base, segment_length: int, num_sensory: int = 32, summary_fraction: float = 0.5, **extra: Any):
    """``peft.get_peft_model`` with an HMTConfig; returns the PeftModel (its ``.base_model`` is the HMTModel)."""
    config = HMTConfig(
        task_type="CAUSAL_LM",
        segment_length=segment_length,
        num_sensory=num_sensory,
        summary_fraction=summary_fraction,
        **extra,
    )
    return peft.get_peft_model(base, config)


# ---- the inference benchmarks' model (ingestion, decoding) -----------------------------------------------------------
INFERENCE_MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       intermediate_size=688, vocab_size=1024, max_position_embeddings=512)
INFERENCE_HMT = dict(segment_length=256, num_sensory=32, recall_window=300, recall_dim=256, recall_query="segment")


def inference_model(max_positions: int = 512, with_hmt: bool = True):
    """The tiny random Llama of the inference benchmarks (`INFERENCE_MODEL`, tied embeddings, eval mode), with HMT
    (`INFERENCE_HMT`) unless ``with_hmt=False``."""
    m = INFERENCE_MODEL
    base = llama(
        m["vocab_size"], m["hidden_size"], m["num_hidden_layers"], m["num_attention_heads"], m["intermediate_size"],
        max_positions, True,
    ).eval()
    return attach_hmt(base, **INFERENCE_HMT).eval() if with_hmt else base


# ---- the backbone a benchmark pretrains (quality, retrieval) ----------------------------------------------------------
def tiny_backbone(s: Any, vocab_size: int):
    """A small Llama of the shape in settings ``s`` (`benchmarks.lab.settings.Settings`): tied embeddings, float32,
    positions up to 4 windows, special tokens <pad>=0 <s>=1 </s>=2 (the lab tokenizer's), seeded by ``s.seed``."""
    return llama(
        vocab_size, s.hidden_size, s.num_layers, s.num_heads, (s.hidden_size * 8 // 3 + 31) // 32 * 32,
        4 * s.segment_length, True, seed=s.seed, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def load_backbone(path: str):
    """A saved backbone, float32, frozen."""
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    base.requires_grad_(False)
    return base
