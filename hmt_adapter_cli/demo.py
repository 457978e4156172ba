"""`hmt-adapter demo`: an offline demonstration that HMT gives a short-window model long memory.

Run it with ``hmt-adapter demo`` (or ``python -m hmt_adapter_cli.demo``). On 2 CPU cores it takes a few minutes:

1. builds a tiny Llama backbone and the tiny word-level tokenizer of `hmt_adapter.testing` (no download);
2. pretrains the backbone on short windows (at most ``segment_length`` tokens) of a passkey task: a window of
   filler words holds one key word (one of ``num_keys``); at the query mark ``?`` the model must name the key;
3. freezes it, attaches HMT with ``peft.get_peft_model(backbone, HMTConfig(...))`` and trains only the HMT
   parameters with TRL's ``SFTTrainer`` on inputs many segments long, where the key lies segments before the
   query;
4. measures accuracy by context length (1x, 2x, 4x, 8x the window) for the backbone alone (reading the last
   window it can fit) and with HMT, saves the adapter, reloads it onto a freshly loaded copy of the backbone,
   checks that the outputs are identical, and writes ``results.json`` and ``accuracy.png``.

This module is a command-line entry point, so unlike the rest of `hmt_adapter` it prints (progress and the
results table). The printing lives in the small ``_print_*`` functions at the end. torch and the other frameworks
are imported inside the functions that use them, so ``--help`` and argument errors answer at once.

Everything the demo writes goes under ``--output-dir`` (default ``hmt-demo-output`` in the working directory):
``results.json``, ``accuracy.png``, ``backbone/`` (the pretrained backbone with its tokenizer) and ``adapter/``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from .arguments import OneLineParser, normalize_flags

if TYPE_CHECKING:
    import torch

QUERY_WORD = "?"
#: Key words: the passkey is one of the first ``num_keys`` of these (chance = 1 / num_keys).
KEY_WORDS: tuple[str, ...] = (
    "cat", "dog", "bird", "fish", "tree", "house", "car", "book",
    "sun", "moon", "star", "water", "fire", "city", "road", "river",
)


@dataclass
class DemoSettings:
    """Every knob of the demo. The defaults are the measured configuration (see BENCHMARKS.md, "Demo")."""

    output_dir: str = "hmt-demo-output"
    seed: int = 0
    # task
    num_keys: int = 16  # chance level = 1 / num_keys
    multiples: tuple[int, ...] = (1, 2, 4, 8)  # context lengths, in backbone windows (= segments)
    # backbone
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    segment_length: int = 16  # the backbone's window, and HMT's segment length
    pretrain_steps: int = 600
    pretrain_batch: int = 64
    pretrain_lr: float = 3e-3
    # HMT
    num_sensory: int = 4
    recall_dim: int = 32
    recall_window: int = 16
    hmt_steps: int = 400
    hmt_batch: int = 32
    hmt_lr: float = 3e-3
    # Lengths (in segments) of the HMT training inputs, drawn uniformly from this list. 2 appears twice: short
    # inputs teach the memory write first (with 8-segment inputs alone, training stays at chance for longer).
    train_segments: tuple[int, ...] = (2, 2, 3, 4, 5, 6, 7, 8)
    train_examples: int = 0  # 0: hmt_steps * hmt_batch (each example seen once)
    # evaluation
    eval_examples: int = 256
    eval_batch: int = 64


# ---------------------------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------------------------
@dataclass
class PasskeyTask:
    """Token ids of the passkey task built on the tiny tokenizer's vocabulary.

    An example of ``length`` tokens is ``filler ... key ... filler ? key``: the key (one of ``key_ids``) sits
    once among random filler words, the second-to-last token is the query mark, the last is the answer.
    """

    key_ids: list[int]
    filler_ids: list[int]
    query_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer, num_keys: int) -> "PasskeyTask":
        if not 2 <= num_keys <= len(KEY_WORDS):
            raise ValueError(f"num_keys must be in [2, {len(KEY_WORDS)}], got {num_keys}.")
        vocab = tokenizer.get_vocab()
        keys = [vocab[w] for w in KEY_WORDS[:num_keys]]
        reserved = set(vocab[w] for w in KEY_WORDS) | {vocab[QUERY_WORD]} | set(tokenizer.all_special_ids)
        filler = sorted(i for i in vocab.values() if i not in reserved)
        return cls(key_ids=keys, filler_ids=filler, query_id=vocab[QUERY_WORD])

    def example(self, length: int, key_pos: int, rng: random.Random) -> tuple[list[int], int]:
        """One example of ``length`` tokens with the key at ``key_pos`` (< length - 2); returns (ids, key)."""
        key = rng.choice(self.key_ids)
        ids = [rng.choice(self.filler_ids) for _ in range(length - 2)] + [self.query_id, key]
        ids[key_pos] = key
        return ids, key

    def window_example(self, length: int, rng: random.Random) -> tuple[list[int], int]:
        """A short pretraining window: the key anywhere before the query, often first (like a memory slot)."""
        pos = 0 if rng.random() < 0.25 else rng.randrange(length - 2)
        return self.example(length, pos, rng)

    def long_example(self, multiple: int, settings: DemoSettings, rng: random.Random) -> tuple[list[int], int]:
        """An input ``multiple`` windows long. Beyond 1x the key lies outside the last window and away from the
        sensory tokens HMT carries over a border, so only memory can bring it to the query."""
        length = multiple * settings.segment_length
        if multiple == 1:
            return self.example(length, rng.randrange(length - 2), rng)
        latest = length - settings.segment_length - settings.num_sensory  # exclusive
        return self.example(length, rng.randrange(latest), rng)


def tensor_batch(examples: Sequence[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), keys (B,)) from equal-length examples."""
    import torch

    ids = torch.tensor([e[0] for e in examples], dtype=torch.long)
    keys = torch.tensor([e[1] for e in examples], dtype=torch.long)
    return ids, keys


# ---------------------------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------------------------
def build_backbone(settings: DemoSettings, vocab_size: int):
    """A tiny Llama (tied embeddings, so its last hidden state lives in the embedding space)."""
    import torch
    from transformers import AutoModelForCausalLM

    from hmt_adapter.testing import tiny_config

    config = tiny_config(
        "llama",
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=2 * settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_heads,
        tie_word_embeddings=True,
        max_position_embeddings=4 * settings.segment_length,
    )
    torch.manual_seed(settings.seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def pretrain_backbone(model, task: PasskeyTask, settings: DemoSettings) -> list[float]:
    """Train the backbone on windows of 4..segment_length tokens; loss on the answer only. Returns losses."""
    import torch
    import torch.nn.functional as F

    rng = random.Random(settings.seed + 1)
    optim = torch.optim.AdamW(model.parameters(), lr=settings.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, settings.pretrain_lr, total_steps=settings.pretrain_steps)
    model.train()
    losses = []
    for _ in range(settings.pretrain_steps):
        length = rng.randint(4, settings.segment_length)
        ids, keys = tensor_batch([task.window_example(length, rng) for _ in range(settings.pretrain_batch)])
        logits = model(input_ids=ids, logits_to_keep=2).logits[:, 0]  # prediction at the query mark
        loss = F.cross_entropy(logits, keys)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------
def eval_sets(task: PasskeyTask, settings: DemoSettings) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Held-out examples per context multiple (their own seed, disjoint from the training stream)."""
    rng = random.Random(settings.seed + 1000)
    return {
        m: tensor_batch([task.long_example(m, settings, rng) for _ in range(settings.eval_examples)])
        for m in settings.multiples
    }


def answer_logits(model, ids: torch.Tensor, batch: int, window: Optional[int] = None) -> torch.Tensor:
    """Logits (N, V) at the query mark; ``window``: feed only the last ``window`` tokens (the backbone alone)."""
    import torch

    if window is not None:
        ids = ids[:, -window:]
    with torch.no_grad():
        out = [model(input_ids=ids[i : i + batch], logits_to_keep=2).logits[:, 0] for i in range(0, len(ids), batch)]
    return torch.cat(out).float()


def accuracy(logits: torch.Tensor, keys: torch.Tensor) -> float:
    return float((logits.argmax(-1) == keys).float().mean())


def evaluate(model, sets, settings: DemoSettings, window: Optional[int] = None) -> dict[int, float]:
    """Accuracy per context multiple."""
    model.eval()
    return {m: accuracy(answer_logits(model, ids, settings.eval_batch, window), keys) for m, (ids, keys) in sets.items()}


# ---------------------------------------------------------------------------------------------------------
# HMT training with TRL
# ---------------------------------------------------------------------------------------------------------
def hmt_config(settings: DemoSettings, lora_r: int = 0):
    from hmt_adapter.tuner.config import HMTConfig

    return HMTConfig(
        task_type="CAUSAL_LM",
        segment_length=settings.segment_length,
        num_sensory=settings.num_sensory,
        recall_dim=settings.recall_dim,
        recall_window=settings.recall_window,
        lora_r=lora_r,
    )


def sft_dataset(task: PasskeyTask, settings: DemoSettings):
    """Pre-tokenized SFT data: ``input_ids`` and a ``completion_mask`` that scores only the answer."""
    from datasets import Dataset

    rng = random.Random(settings.seed + 2)
    n = settings.train_examples or settings.hmt_steps * settings.hmt_batch
    rows = {"input_ids": [], "completion_mask": []}
    for _ in range(n):
        ids, _ = task.long_example(rng.choice(settings.train_segments), settings, rng)
        rows["input_ids"].append(ids)
        rows["completion_mask"].append([0] * (len(ids) - 1) + [1])
    return Dataset.from_dict(rows)


def train_hmt(peft_model, tokenizer, dataset, settings: DemoSettings, work_dir: Path):
    """Train the HMT parameters with TRL's SFTTrainer (its defaults: fused-head loss, gradient checkpointing)."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(work_dir),
        max_steps=settings.hmt_steps,
        per_device_train_batch_size=settings.hmt_batch,
        learning_rate=settings.hmt_lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=max(1, settings.hmt_steps // 20),
        completion_only_loss=True,
        train_sampling_strategy="group_by_length",  # batches of similar length: less padding, same memory work
        max_length=max(settings.train_segments) * settings.segment_length,
        logging_steps=max(1, settings.hmt_steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=settings.seed,
        data_seed=settings.seed,
        disable_tqdm=True,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)  # the demo reports the loss in its own lines
    trainer.train()
    return trainer


# ---------------------------------------------------------------------------------------------------------
# Save, reload, check
# ---------------------------------------------------------------------------------------------------------
def save_and_reload(peft_model, backbone_dir: Path, adapter_dir: Path, probe: torch.Tensor, batch: int):
    """Save the adapter, load it onto a fresh copy of the backbone, and compare answer logits on ``probe``.

    Returns (reloaded model, max |difference|, whether the adapter file holds HMT weights only).
    """
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    peft_model.save_pretrained(str(adapter_dir))
    fresh = AutoModelForCausalLM.from_pretrained(str(backbone_dir), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(fresh, str(adapter_dir))
    reloaded.eval()
    before = answer_logits(peft_model, probe, batch)
    after = answer_logits(reloaded, probe, batch)
    from peft.utils import SAFETENSORS_WEIGHTS_NAME

    from hmt_adapter.tuner.weights import ADAPTER_KEY_MARKER

    weights = load_file(str(adapter_dir / SAFETENSORS_WEIGHTS_NAME))
    adapter_only = all(ADAPTER_KEY_MARKER in k for k in weights)  # HMT's LoRA weights are '.hmt_lora_A/B' too
    return reloaded, float((before - after).abs().max()), adapter_only


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------
def write_plot(results: dict, path: Path) -> None:
    """Accuracy by context length: backbone alone vs with HMT, with the chance level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = results["settings"]["segment_length"]
    xs = [m * window for m in results["settings"]["multiples"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label, style in (("backbone", "backbone alone (last window)", "s--"), ("hmt", "frozen backbone + HMT", "o-")):
        ax.plot(xs, [100 * results["accuracy"][name][str(m)] for m in results["settings"]["multiples"]], style, label=label)
    ax.axhline(100 * results["chance"], color="gray", linestyle=":", label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x}\n({x // window}x)" for x in xs])
    ax.set_ylim(0, 105)
    ax.set_xlabel(f"context length in tokens (backbone window = {window})")
    ax.set_ylabel("passkey accuracy (%)")
    ax.set_title("Passkey retrieval: tiny Llama, frozen, with and without HMT")
    ax.legend(loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _remove_if_empty(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def _print_step(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)


def _print_table(results: dict) -> None:
    window = results["settings"]["segment_length"]
    multiples = results["settings"]["multiples"]
    header = f"{'context':>16} | {'backbone alone':>14} | {'backbone + HMT':>14}"
    print("\nPasskey accuracy by context length "
          f"({results['settings']['eval_examples']} examples each, chance = {100 * results['chance']:.1f}%)")
    print(header)
    print("-" * len(header))
    for m in multiples:
        b, h = results["accuracy"]["backbone"][str(m)], results["accuracy"]["hmt"][str(m)]
        print(f"{f'{m * window} tok ({m}x)':>16} | {100 * b:13.1f}% | {100 * h:13.1f}%")
    print(flush=True)


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    defaults = DemoSettings()
    parser = OneLineParser(
        prog="hmt-adapter demo",
        description="Offline demo: a tiny frozen backbone + HMT on passkey retrieval at 1x-8x its window. "
        "Flags take both spellings (--output-dir or --output_dir).",
    )
    parser.add_argument(
        "--output-dir", default=defaults.output_dir,
        help="where results.json, accuracy.png, backbone/ and adapter/ go (default: %(default)s, in the working "
        "directory)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--pretrain-steps", type=int, default=defaults.pretrain_steps)
    parser.add_argument("--hmt-steps", type=int, default=defaults.hmt_steps)
    parser.add_argument("--eval-examples", type=int, default=defaults.eval_examples)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads; 1 is fastest for this tiny model (0: torch's default)",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    return DemoSettings(
        output_dir=args.output_dir,
        seed=args.seed,
        pretrain_steps=args.pretrain_steps,
        hmt_steps=args.hmt_steps,
        eval_examples=args.eval_examples,
    )


def run_demo(settings: DemoSettings) -> dict:
    """The whole demo; returns the results dictionary (also written to ``output_dir/results.json``). The console
    gets the demo's own lines only (no progress bars or trainer log dicts)."""
    from .quiet import no_progress_bars

    with no_progress_bars():
        return _run_demo(settings)


def _run_demo(settings: DemoSettings) -> dict:
    import peft
    import torch

    from hmt_adapter.testing import tiny_tokenizer

    start = time.perf_counter()
    out = Path(settings.output_dir)
    _print_step(f"writing results.json, accuracy.png, backbone/ and adapter/ to {out.resolve()}", start)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    tokenizer = tiny_tokenizer()
    task = PasskeyTask.from_tokenizer(tokenizer, settings.num_keys)
    window = settings.segment_length

    backbone = build_backbone(settings, len(tokenizer))
    _print_step(f"pretraining a {sum(p.numel() for p in backbone.parameters()):,}-parameter Llama on windows "
                f"of <= {window} tokens ({settings.pretrain_steps} steps)", start)
    losses = pretrain_backbone(backbone, task, settings)
    backbone.save_pretrained(str(out / "backbone"))
    tokenizer.save_pretrained(str(out / "backbone"))  # a complete model folder: recipes/retrieval-tiny.yaml trains on it
    sets = eval_sets(task, settings)
    base_acc = evaluate(backbone, sets, settings, window=window)
    _print_step(f"backbone trained (final loss {sum(losses[-20:]) / 20:.3f}); accuracy at 1x: "
                f"{100 * base_acc[1]:.1f}%", start) if 1 in base_acc else None

    peft_model = peft.get_peft_model(backbone, hmt_config(settings))
    trainable, total = peft_model.get_nb_trainable_parameters()
    _print_step(f"frozen backbone + HMT: {trainable:,} trainable of {total:,} parameters; training "
                f"{settings.hmt_steps} steps with TRL SFTTrainer on {min(settings.train_segments)}-"
                f"{max(settings.train_segments)} segment inputs", start)
    trainer = train_hmt(peft_model, tokenizer, sft_dataset(task, settings), settings, out / "trainer")
    _remove_if_empty(out / "trainer")  # SFTTrainer creates its output_dir; with save_strategy="no" nothing lands there
    logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    if logged:
        _print_step(f"HMT trained: loss {logged[0]:.3f} -> {logged[-1]:.3f} ({len(logged)} logged steps)", start)
    hmt_acc = evaluate(peft_model, sets, settings)

    _print_step("saving the adapter and reloading it onto a fresh copy of the backbone", start)
    probe = sets[max(settings.multiples)][0][: settings.eval_batch]
    _, reload_diff, adapter_only = save_and_reload(peft_model, out / "backbone", out / "adapter", probe,
                                                   settings.eval_batch)
    results = {
        "task": "passkey retrieval (single key word among filler; answer at the final '?')",
        "chance": 1.0 / settings.num_keys,
        "accuracy": {"backbone": {str(m): a for m, a in base_acc.items()}, "hmt": {str(m): a for m, a in hmt_acc.items()}},
        "reload_max_abs_diff": reload_diff,
        "reload_identical": reload_diff == 0.0,
        "adapter_weights_only": adapter_only,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "pretrain_final_loss": sum(losses[-20:]) / 20,
        "hmt_train_log": [r for r in trainer.state.log_history if "loss" in r],
        "seconds": time.perf_counter() - start,
        "settings": asdict(settings),
        "torch_threads": torch.get_num_threads(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_plot(results, out / "accuracy.png")
    _print_table(results)
    _print_step(f"reloaded adapter: max |logit difference| = {reload_diff:g} "
                f"({'identical' if reload_diff == 0.0 else 'DIFFERENT'}); wrote {out / 'results.json'}, "
                f"{out / 'accuracy.png'} and the adapter in {out / 'adapter'}", start)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    """``hmt-adapter demo [--output-dir DIR] [--seed N] ...``; returns the process exit code."""
    import sys

    args = make_parser().parse_args(normalize_flags(sys.argv[1:] if argv is None else argv))
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    results = run_demo(settings_from_args(args))
    return 0 if results["reload_identical"] and results["adapter_weights_only"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
