"""Train an HMT adapter with TRL's SFTTrainer by passing `peft_config=HMTConfig(...)`.

    python examples/sft_peft_config.py                                   # offline: tiny model, tiny text
    python examples/sft_peft_config.py --model HuggingFaceTB/SmolLM-135M --data-files books.jsonl \
        --segment-length 1024 --max-steps 200

The model stays frozen; only HMT's parameters (about 1% of the model) train. TRL's defaults are kept: its fused
LM-head loss, gradient checkpointing and bf16 where supported. `max_length=None` lets documents of any length
through (HMT reads them segment by segment); `check_max_length` would flag any that a limit would cut.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset, load_dataset
from trl import SFTConfig, SFTTrainer

from hmt_adapter import HMTConfig
from hmt_adapter.integrations.trl import check_max_length, check_sft_args


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Hub id or local dir (default: the tiny offline model).")
    p.add_argument("--data-files", default=None, help="Local .jsonl/.json/.parquet with a 'text' column.")
    p.add_argument("--segment-length", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--output-dir", default="outputs/sft-peft-config",
                   help="Where the adapter goes (default: %(default)s, in the working directory).")
    return p


def load(args: argparse.Namespace):
    if args.model is None:
        from hmt_adapter.testing import tiny_causal_lm, tiny_tokenizer

        return tiny_causal_lm("llama"), tiny_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)


def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    model, tokenizer = load(args)
    if args.data_files:
        builder = "parquet" if args.data_files.endswith(".parquet") else "json"
        dataset = load_dataset(builder, data_files=args.data_files, split="train")
    else:
        dataset = Dataset.from_dict({"text": [" ".join(["the king reads a book . the cat sees the dog ."] * 8)] * 16})
    config = HMTConfig(task_type="CAUSAL_LM", segment_length=args.segment_length, num_sensory=4, recall_dim=64)
    sft = SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=2, learning_rate=1e-3,
        max_length=None, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )
    check_sft_args(sft)  # padding-free / packing layouts HMT cannot carry memory through
    check_max_length(dataset, sft.max_length, tokenizer)
    trainer = SFTTrainer(model=model, peft_config=config, args=sft, train_dataset=dataset, processing_class=tokenizer)
    trainer.model.print_trainable_parameters()
    trainer.train()
    trainer.save_model()  # adapter_config.json + adapter_model.safetensors only
    print(f"adapter saved to {args.output_dir}")


if __name__ == "__main__":
    main()
