"""QLoRA-style HMT: a 4-bit (nf4) frozen backbone, LoRA on its linear layers and HMT, in one adapter.

    python examples/qlora_4bit.py                                        # offline: saves a tiny model, loads it in 4 bits
    python examples/qlora_4bit.py --model meta-llama/Llama-2-7b-hf --segment-length 256 --max-steps 200

bitsandbytes 0.50 runs nf4 on the CPU too, so the offline run works without a GPU. The saved adapter holds the
HMT parameters and the LoRA weights together; `PeftModel.from_pretrained(base_4bit, output_dir)` restores both.
"""

from __future__ import annotations

import argparse
import os

import peft
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from hmt_adapter import HMTConfig


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Hub id or local dir (default: a tiny model saved locally).")
    p.add_argument("--segment-length", type=int, default=16)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=5)
    p.add_argument("--output-dir", default="outputs/qlora-4bit",
                   help="Where the adapter (and tiny-base/, the offline base model) go (default: %(default)s, in the "
                   "working directory).")
    return p


def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    model_path, tokenizer = args.model, None
    if model_path is None:  # build and save the tiny offline model so it can be loaded in 4 bits
        from hmt_adapter.testing import tiny_causal_lm, tiny_tokenizer

        model_path = os.path.join(args.output_dir, "tiny-base")
        tiny_causal_lm("llama").save_pretrained(model_path)
        tokenizer = tiny_tokenizer()
    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    base = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quant, dtype=compute)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
    config = HMTConfig(
        task_type="CAUSAL_LM", segment_length=args.segment_length, num_sensory=4, recall_dim=64,
        lora_r=args.lora_r, lora_alpha=4 * args.lora_r, lora_target_modules="all-linear",
    )
    dataset = Dataset.from_dict({"text": [" ".join(["the queen knows the river ."] * 12)] * 8})
    sft = SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=2, learning_rate=1e-3,
        max_length=None, logging_steps=1, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(),
    )
    trainer = SFTTrainer(model=base, peft_config=config, args=sft, train_dataset=dataset, processing_class=tokenizer)
    trainer.model.print_trainable_parameters()
    trainer.train()
    trainer.save_model()
    reloaded = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quant, dtype=compute), args.output_dir
    )
    kinds = sorted({part for n, _ in reloaded.named_parameters() for part in n.split(".") if part.startswith(("lora_", "hmt_"))})
    print(f"adapter saved to {args.output_dir}; reloaded parameter groups: {kinds}")


if __name__ == "__main__":
    main()
