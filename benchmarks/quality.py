"""Quality on real text: long-document perplexity of a frozen backbone + HMT vs the backbone alone.

Corpus: the reStructuredText sources of the Python 3.11 documentation, shipped by Debian's ``python3.11-doc``
package (pulled in by ``python3-doc``) under ``/usr/share/doc/python3.11/html/_sources/`` as ``*.rst.txt``
files. Install it with::

    apt-get install -y python3-doc

Every ``.rst.txt`` file is one document; a deterministic hash (SHA-256) of its path relative to the corpus root
puts it in the training or the held-out split, so the split never changes between runs or machines.

Protocol (small scale, CPU):

1. a byte-level BPE tokenizer (``tokenizers``) trained on the training split, wrapped as a transformers
   ``PreTrainedTokenizerFast``;
2. a small Llama (``LlamaConfig``) pretrained from scratch on random windows of ``segment_length`` tokens of the
   training split (plain torch loop, AdamW, warm-up + cosine over at most ``pretrain_steps``), stopped early once its
   loss on fixed windows of validation documents has flattened (`plateaued`: the best of the last
   ``plateau_checks`` checks, one every ``pretrain_eval_every`` steps, is < ``plateau_tolerance`` below the check
   before them). The validation documents are a salted-hash subset of the training split, used for nothing else;
3. the backbone frozen, HMT attached with ``peft.get_peft_model(backbone, HMTConfig(...))``, the HMT parameters
   trained with TRL's ``SFTTrainer`` on training documents cut into pieces of ``train_segments`` segments
   (`hmt_adapter.integrations.trl.chunk_token_ids`, ``max_length`` checked with `check_max_length`);
4. two controls for LoRA (``--no-lora`` skips both): HMT + LoRA (``HMTConfig(lora_r=8, lora_alpha=32)``), and
   LoRA alone (plain ``peft.LoraConfig``, same rank and alpha, on exactly the modules HMT's LoRA wraps). Both train
   with the same SFTTrainer arguments, steps and pieces as HMT; LoRA alone sees each piece cut into independent
   windows of ``segment_length`` tokens (`window_collator`), the layout it is scored in;
5. held-out documents scored with `hmt_adapter.evaluation`: HMT, the backbone (and LoRA alone) over independent
   windows of ``segment_length`` tokens, and the backbone over a sliding window of that width at two strides:
   ``segment_length // 2`` and the stride whose backbone positions per token equal HMT's (`matching_stride`).
   The same tokens are scored by every method.

Width: every baseline reads windows of ``segment_length`` tokens, the backbone's pretraining window and the number of
new tokens HMT reads per segment pass (HMT's pass adds 2 memory slots and ``num_sensory`` sensory tokens; that extra
work is in its positions-per-token count). Positions per token are counted, not estimated: what each method's
forward passes feed the backbone over the scored documents, divided by the targets scored (`hmt_positions`,
`sliding_positions`; tests check both against the real forward passes).

Run (from the repository root)::

    python -m benchmarks.quality --threads 1   # full run (24-40 min on one thread of a shared 2-core machine)
    python -m benchmarks.quality --no-lora     # without the two LoRA rows
    python -m benchmarks.quality --quick       # smoke run (under a minute)

Outputs: ``quality.json`` and ``quality.png`` in ``--output-dir`` (default benchmarks/output; ``--update-results``:
benchmarks/results) (``--quick`` writes ``quality_quick.*``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import datasets
import peft
import tokenizers
import torch
import transformers
import trl
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from benchmarks.lab import corpus as K
from benchmarks.lab import output as O
from benchmarks.lab.backbone import load_backbone, tiny_backbone
from benchmarks.lab.pretrain import pretrain_until_plateau, validation_windows
from benchmarks.lab.settings import Settings
from benchmarks.lab.tokenizer import encode_documents, train_tokenizer
from hmt_adapter import HMTConfig  # (importing hmt_adapter registers the HMT adapter type with PEFT)
from hmt_adapter.evaluation import MethodResult, backbone_window_nll, evaluate_long_documents
from hmt_adapter.integrations.trl import check_max_length, check_sft_args, chunk_token_ids
from hmt_adapter.tuner.lora import lora_target_names


@dataclass
class QualitySettings(Settings):
    """Every knob of the benchmark (`Settings`' and these); the defaults are the full run reported in BENCHMARKS.md."""

    corpus_dir: str = K.CORPUS_DIR
    heldout_fraction: float = 0.15
    # plateau rule of pretraining: every pretrain_eval_every steps score pretrain_eval_windows fixed windows of the
    # validation documents; stop when the best of the last plateau_checks checks is less than plateau_tolerance
    # (relative, on the loss in nats) below the check before them
    validation_fraction: float = 0.05  # of the training documents: kept out of pretraining and of SFT
    pretrain_eval_every: int = 100
    pretrain_eval_windows: int = 64
    plateau_checks: int = 4
    plateau_tolerance: float = 0.005
    # HMT
    recall_window: int = 300
    train_segments: int = 8  # training pieces: documents cut into pieces of train_segments * segment_length
    gradient_checkpointing: bool = False  # tiny model: memory is no issue, recomputation would cost ~30% time
    # HMT + LoRA (HMTConfig(lora_r, lora_alpha)) and LoRA alone (peft.LoraConfig on the same modules), both trained
    # like HMT: same trainer, steps, learning rate and pieces; LoRA alone sees them cut into independent windows
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 32
    # evaluation
    eval_max_segments: int = 24  # each held-out document is scored on its first eval_max_segments segments
    eval_min_segments: int = 2  # held-out documents shorter than this many segments are skipped
    eval_max_documents: int = 0  # 0: all held-out documents long enough
    stride: int = 0  # sliding-window stride at equal width; 0: segment_length // 2
    output_name: str = "quality"


def quick_settings(**overrides: Any) -> QualitySettings:
    """Tiny settings for a smoke run: a small model, few steps, few documents."""
    base = dict(
        hidden_size=64, num_layers=2, num_heads=2, vocab_size=1024, segment_length=32, pretrain_steps=40,
        pretrain_batch=8, pretrain_eval_every=10, pretrain_eval_windows=16, plateau_checks=2, num_sensory=4,
        recall_dim=32, hmt_steps=6, hmt_batch=2, train_segments=4, eval_max_segments=6, eval_max_documents=4, output_name="quality_quick", threads=1,
    )
    base.update(overrides)
    return QualitySettings(**base)


# ---------------------------------------------------------------------------------------------------------
# HMT training with TRL
# ---------------------------------------------------------------------------------------------------------
def hmt_config(settings: QualitySettings, lora: bool):
    extra = dict(lora_r=settings.lora_r, lora_alpha=settings.lora_alpha) if lora else {}
    return HMTConfig(
        task_type="CAUSAL_LM",
        segment_length=settings.segment_length,
        num_sensory=settings.num_sensory,
        recall_dim=settings.recall_dim,
        recall_window=settings.recall_window,
        recall_query=settings.recall_query,
        **extra,
    )


def sft_dataset(train_token_docs: Sequence[Sequence[int]], settings: QualitySettings):
    """Training documents cut into pieces of ``train_segments`` segments (pieces under 2 segments dropped), and a
    seeded sample of ``hmt_steps * hmt_batch`` of them (each seen once). Returns (dataset, pieces available)."""
    chunks = chunk_token_ids(train_token_docs, settings.train_segments * settings.segment_length,
                             min_tokens=2 * settings.segment_length)
    wanted = settings.hmt_steps * settings.hmt_batch  # each piece seen at most once
    available = len(chunks)
    if available > wanted:
        chunks = random.Random(settings.seed + 2).sample(chunks, wanted)
    return Dataset.from_dict({"input_ids": chunks}), available


def lora_only_model(base, settings: QualitySettings):
    """The backbone + plain PEFT LoRA (``peft.LoraConfig``) on exactly the modules HMT + LoRA wraps (HMT's
    ``lora_target_modules="all-linear"``: every linear layer but the LM head), same rank, alpha and dropout (0)."""
    targets = lora_target_names(base, hmt_config(settings, lora=True).lora_target_modules)
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=settings.lora_r, lora_alpha=settings.lora_alpha,
                             lora_dropout=0.0, target_modules=targets)
    return peft.get_peft_model(base, config)


def to_windows(batch: dict[str, torch.Tensor], width: int, pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Cut every row of a right-padded causal-LM batch into independent windows of ``width`` tokens.

    ``input_ids``, ``labels``, ``attention_mask``: (B, T) -> (N, width), rows in order, each row's windows in order;
    T is padded (with ``pad_token_id``, label -100) up to a multiple of ``width`` and windows with fewer than 2 real tokens (no target) are dropped.
    The first label of every window is set to -100: nothing inside the window predicts it, so label counts (TRL's
    ``num_items_in_batch``) count only what the loss scores.
    """
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    rows, length = ids.shape
    pad = (-length) % width
    if pad:
        ids = torch.nn.functional.pad(ids, (0, pad), value=pad_token_id)
        labels = torch.nn.functional.pad(labels, (0, pad), value=-100)
        mask = torch.nn.functional.pad(mask, (0, pad), value=0)
    ids, labels, mask = (t.reshape(-1, width) for t in (ids, labels, mask))  # (B * T' / width, width)
    keep = mask.sum(1) >= 2
    labels = labels.clone()
    labels[:, 0] = -100
    return {"input_ids": ids[keep], "labels": labels[keep], "attention_mask": mask[keep]}


def window_collator(pad_token_id: int, width: int):
    """TRL's language-modelling collator followed by `to_windows`: LoRA alone trains on the pieces HMT trains on,
    cut at every ``width`` tokens (the independent-windows layout it is scored in)."""
    class WindowCollator(DataCollatorForLanguageModeling):
        def torch_call(self, examples):
            return to_windows(super().torch_call(examples), width, pad_token_id)

    return WindowCollator(pad_token_id=pad_token_id)


def train_adapter(peft_model, tokenizer, dataset, settings: QualitySettings, work_dir: str, data_collator=None):
    """Train the adapter's parameters with TRL's SFTTrainer (HMT, HMT + LoRA, and LoRA alone with
    ``data_collator=window_collator(...)``: the same arguments, so the same steps, order of pieces and learning rate).
    Returns the trainer."""
    max_length = settings.train_segments * settings.segment_length
    args = SFTConfig(
        output_dir=work_dir,
        max_steps=settings.hmt_steps,
        per_device_train_batch_size=settings.hmt_batch,
        learning_rate=settings.hmt_lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, settings.hmt_steps // 20),
        max_length=max_length,
        gradient_checkpointing=settings.gradient_checkpointing,
        logging_steps=max(1, settings.hmt_steps // 10),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=settings.seed,
        data_seed=settings.seed,
        disable_tqdm=True,
    )
    check_sft_args(args)
    check_max_length(dataset, max_length)
    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         data_collator=data_collator)
    trainer.train()
    peft_model.eval()
    return trainer


# ---------------------------------------------------------------------------------------------------------
# Compute accounting: backbone positions run per document (what the evaluation's forward passes feed)
# ---------------------------------------------------------------------------------------------------------
def window_positions(num_tokens: int, window: int) -> int:
    """Independent windows (`backbone_window_nll`): the T - 1 input positions, each run once."""
    return num_tokens - 1


def sliding_positions(num_tokens: int, window: int, stride: int) -> int:
    """Sliding window (`backbone_sliding_nll`): the total width of the windows it runs over T - 1 targets."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}.")
    targets, scored, begin, total = num_tokens - 1, 0, 0, 0
    while scored < targets:
        end = min(begin + window, targets)
        total += end - begin
        scored, begin = end, begin + stride
    return total


def hmt_positions(num_tokens: int, config) -> int:
    """HMT over one document of T tokens: every segment pass ``[m ; sensory ; x ; m]`` plus every summary pass
    ``[s ; tokens ; s]`` (segments >= 1, with recall), real positions only (the batched summary pass also pads a
    short last segment's window; those positions are not counted)."""
    seg, k, width = config.segment_length, config.num_sensory, config.summary_length
    num_segments = math.ceil(num_tokens / seg)
    total = 0
    for n in range(num_segments):
        x_len = min(seg, num_tokens - n * seg)
        total += 2 + min(k, n * seg) + x_len
        if config.use_recall and n >= 1:
            total += 2 + (min(width, x_len) if config.recall_query == "segment" else width)
    return total


def nominal_hmt_positions_per_token(config) -> float:
    """HMT's positions per token in a long document (every segment full, with sensory and summary):
    ``1 + (num_sensory + 2) / L + (summary_length + 2) / L`` with recall (1.66 at L=128, k=16, fraction 0.5)."""
    seg = config.segment_length
    summary = config.summary_length + 2 if config.use_recall else 0
    return (seg + config.num_sensory + 2 + summary) / seg


def positions_per_token(documents: Sequence[Sequence[int]], positions) -> float:
    """Backbone positions run per scored target over ``documents``; ``positions(T)`` counts one document."""
    return sum(positions(len(d)) for d in documents) / sum(len(d) - 1 for d in documents)


def matching_stride(documents: Sequence[Sequence[int]], window: int, target: float) -> int:
    """The sliding-window stride whose positions per token over ``documents`` is closest to ``target`` (ties: the
    larger stride, i.e. the cheaper one)."""
    def gap(stride: int) -> float:
        return abs(positions_per_token(documents, lambda t: sliding_positions(t, window, stride)) - target)

    return min(range(window, 0, -1), key=gap)


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------
ORDER = ("backbone_window", "lora", "backbone_sliding_matched", "backbone_sliding", "hmt", "hmt_lora")


def label(name: str, results: dict) -> str:
    """The row name of a method, with its widths and strides."""
    ev = results["eval"]
    w = ev["window"]
    return {
        "backbone_window": f"backbone, independent {w}-token windows",
        "lora": f"backbone + LoRA alone, independent {w}-token windows",
        "backbone_sliding_matched": f"backbone, sliding window ({w}, stride {ev['stride_matched']}: HMT's compute)",
        "backbone_sliding": f"backbone, sliding window ({w}, stride {ev['stride']})",
        "hmt": "frozen backbone + HMT",
        "hmt_lora": "backbone + HMT + LoRA",
    }.get(name, name)


def comparisons(methods: dict) -> dict[str, float]:
    """Headline perplexity ratios - 1 (negative: the first method is better), for the pairs that exist."""
    pairs = {
        "hmt_vs_backbone_window": ("hmt", "backbone_window"),
        "hmt_vs_backbone_sliding_matched": ("hmt", "backbone_sliding_matched"),
        "hmt_vs_backbone_sliding": ("hmt", "backbone_sliding"),
        "lora_vs_backbone_window": ("lora", "backbone_window"),
        "hmt_lora_vs_lora": ("hmt_lora", "lora"),
        "hmt_lora_vs_hmt": ("hmt_lora", "hmt"),
        "hmt_lora_vs_backbone_sliding_matched": ("hmt_lora", "backbone_sliding_matched"),
    }
    return {key: methods[a]["perplexity"] / methods[b]["perplexity"] - 1
            for key, (a, b) in pairs.items() if a in methods and b in methods}


def write_plot(results: dict, path: Path) -> None:
    """Loss by segment index per method (left), perplexity per method (middle), pretraining curve (right)."""
    plt = O.pyplot()
    methods = results["methods"]
    seg = results["settings"]["segment_length"]
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [3, 3, 2]})
    for name, res in methods.items():
        # segments scored in at least 5 documents' worth of targets
        keep = [i for i, c in enumerate(res["segment_count"]) if c >= 5 * seg]
        ax.plot(keep, [res["segment_loss"][i] for i in keep], marker=".", label=label(name, results))
    ax.set_xlabel(f"segment index (segment = {seg} tokens)")
    ax.set_ylabel("mean NLL (nats / token)")
    ax.set_title("Held-out loss by segment index")
    ax.legend(fontsize=7)
    names = list(methods)
    ppl = [methods[n]["perplexity"] for n in names]
    ppt = results["positions_per_token"]
    bars = bx.bar(range(len(names)), ppl, color=[f"C{i}" for i in range(len(names))])
    bx.bar_label(bars, labels=[f"{v:.2f}\n{ppt[n]:.2f}x" for v, n in zip(ppl, names)], fontsize=8)
    short = {"backbone_window": "windows", "lora": "LoRA\nalone", "backbone_sliding_matched":
             f"sliding\nstride {results['eval']['stride_matched']}", "backbone_sliding":
             f"sliding\nstride {results['eval']['stride']}", "hmt": "HMT\n(frozen)", "hmt_lora": "HMT\n+ LoRA"}
    bx.set_xticks(range(len(names)), [short.get(n, n) for n in names], fontsize=8)
    bx.set_ylabel("perplexity (label: value, backbone positions per token)")
    bx.set_ylim(min(ppl) * 0.9, max(ppl) * 1.06)
    bx.set_title(f"Held-out perplexity ({results['eval']['tokens_scored']:,} tokens)")
    pre = results["backbone"]
    curve = pre["validation_curve"]
    cx.plot([c["step"] for c in curve], [c["validation_loss"] for c in curve], marker=".", label="validation")
    cx.plot([c["step"] for c in curve[1:]], [c["train_loss"] for c in curve[1:]], label="training (mean since last check)")
    cx.set_xlabel("pretraining step")
    cx.set_ylabel("loss (nats / token)")
    cx.set_ylim(min(c["validation_loss"] for c in curve) * 0.95, curve[min(1, len(curve) - 1)]["validation_loss"] * 1.1)
    cx.set_title(f"Backbone pretraining ({pre['pretrain_steps_run']} steps: {pre['stopped']})")
    cx.legend(fontsize=8)
    fig.suptitle("Python 3.11 docs (Debian python3.11-doc): small Llama pretrained on "
                 f"{seg}-token windows; recall_query={results['settings']['recall_query']!r}", fontsize=10)
    O.save_figure(fig, path, dpi=120)


def _table_rows(results: dict) -> list[tuple[str, float, float, float, Optional[float], float]]:
    methods = results["methods"]
    window = methods["backbone_window"]["perplexity"]
    matched = methods.get("backbone_sliding_matched", {}).get("perplexity")
    return [(label(name, results), res["loss"], res["perplexity"], res["perplexity"] / window - 1,
             res["perplexity"] / matched - 1 if matched else None, results["positions_per_token"][name])
            for name, res in methods.items()]


def print_table(results: dict) -> None:
    header = f"{'method':<62} | {'loss':>7} | {'ppl':>8} | {'vs windows':>10} | {'vs sliding@HMT':>14} | {'pos/tok':>7}"
    print(f"\nHeld-out: {results['eval']['documents']} documents, {results['eval']['tokens_scored']:,} targets each method")
    print(header)
    print("-" * len(header))
    for name, loss, ppl, vs_w, vs_m, ppt in _table_rows(results):
        m = f"{100 * vs_m:+13.1f}%" if vs_m is not None else f"{'-':>14}"
        print(f"{name:<62} | {loss:7.4f} | {ppl:8.3f} | {100 * vs_w:+9.1f}% | {m} | {ppt:6.2f}x")
    print(flush=True)


def markdown_table(results: dict) -> str:
    """The results table as Markdown (for BENCHMARKS.md)."""
    lines = [
        f"Held-out: {results['eval']['documents']} documents, {results['eval']['tokens_scored']:,} scored tokens per "
        f"method (the same tokens for all); recall_query={results['eval']['recall_query']!r}.",
        "",
        "| method | loss (nats/token) | perplexity | vs independent windows | vs sliding window at HMT's compute "
        "| backbone positions per token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, loss, ppl, vs_w, vs_m, ppt in _table_rows(results):
        m = f"{100 * vs_m:+.1f}%" if vs_m is not None else "-"
        lines.append(f"| {name} | {loss:.4f} | {ppl:.2f} | {100 * vs_w:+.1f}% | {m} | {ppt:.2f}x |")
    return "\n".join(lines)


def versions() -> dict[str, Any]:
    try:
        doc_version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "python3.11-doc"], capture_output=True,
                                     text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        doc_version = None
    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "trl": trl.__version__, "tokenizers": tokenizers.__version__,
        "datasets": datasets.__version__, "python3.11-doc": doc_version, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------------
# The benchmark, step by step: corpus and tokenizer, backbone, compute accounting, methods, results
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Data:
    """The corpus, split by path hash and tokenized: what pretraining, adapter training and scoring read."""

    paths: list[str]
    train_paths: list[str]  # the training split (pretraining + validation documents)
    val_paths: list[str]
    heldout_paths: list[str]
    train_texts: list[str]
    heldout_texts: list[str]
    tokenizer: Any
    train_tokens: dict[str, list[int]]
    fit_tokens: list[list[int]]  # the pretraining (and SFT) documents
    heldout_tokens: list[list[int]]
    stream: torch.Tensor  # the pretraining documents, concatenated
    val_stream: torch.Tensor  # the validation documents, concatenated


def load_data(settings: QualitySettings, log: Callable[[str], None]) -> Data:
    """Split the corpus (held-out by path hash; validation out of the training split by a salted hash), train the
    tokenizer on the training split and tokenize everything."""
    paths = K.list_documents(settings.corpus_dir)
    if not paths:
        raise SystemExit(K.missing_corpus_message(settings.corpus_dir))
    train_paths, heldout_paths = K.split_documents(paths, settings.heldout_fraction)
    fit_paths, val_paths = K.split_validation(train_paths, settings.validation_fraction)
    train_texts = K.read_documents(settings.corpus_dir, train_paths)
    heldout_texts = K.read_documents(settings.corpus_dir, heldout_paths)
    log(f"corpus {settings.corpus_dir}: {len(paths)} documents, {len(train_paths)} train ({len(val_paths)} of them "
        f"validation) / {len(heldout_paths)} held-out")

    tokenizer = train_tokenizer(train_texts, settings.vocab_size)
    train_tokens = dict(zip(train_paths, encode_documents(tokenizer, train_texts)))
    fit_tokens = [train_tokens[p] for p in fit_paths]
    heldout_tokens = encode_documents(tokenizer, heldout_texts)
    stream = torch.tensor([t for doc in fit_tokens for t in doc], dtype=torch.long)
    val_stream = torch.tensor([t for p in val_paths for t in train_tokens[p]], dtype=torch.long)
    log(f"tokenizer: vocab {len(tokenizer)}; pretraining stream {stream.numel():,} tokens "
        f"({sum(map(len, train_texts)) / sum(map(len, train_tokens.values())):.2f} chars/token), validation "
        f"{val_stream.numel():,}, held-out {sum(map(len, heldout_tokens)):,} tokens")
    return Data(paths, train_paths, val_paths, heldout_paths, train_texts, heldout_texts, tokenizer, train_tokens,
                fit_tokens, heldout_tokens, stream, val_stream)


def pretrain(data: Data, settings: QualitySettings, log: Callable[[str], None]) -> tuple[Any, dict]:
    """The tiny backbone pretrained on windows of the pretraining documents until its validation loss flattens;
    returns (frozen backbone, record: parameters, seconds, what `pretrain_until_plateau` returned)."""
    validation = validation_windows(data.val_stream, settings.segment_length, settings.pretrain_eval_windows)
    backbone = tiny_backbone(settings, len(data.tokenizer))
    n_params = sum(p.numel() for p in backbone.parameters())
    log(f"pretraining a {n_params:,}-parameter Llama on {settings.segment_length}-token windows (batch "
        f"{settings.pretrain_batch}, at most {settings.pretrain_steps} steps, plateau rule every "
        f"{settings.pretrain_eval_every})")
    t0 = time.perf_counter()
    pre = pretrain_until_plateau(backbone, data.stream, validation, settings, eval_every=settings.pretrain_eval_every,
                                 checks=settings.plateau_checks, tolerance=settings.plateau_tolerance)
    seconds = time.perf_counter() - t0
    log(f"backbone trained: {pre['steps']} steps ({pre['stopped']}), validation loss "
        f"{pre['validation_curve'][-1]['validation_loss']:.3f} ({seconds:.0f}s, {seconds / max(1, pre['steps']):.2f} s/step)")
    return backbone, dict(pre, parameters=n_params, seconds=seconds)


def accounting(docs: Sequence[Sequence[int]], settings: QualitySettings, log: Callable[[str], None]
               ) -> tuple[dict[str, int], dict[str, float]]:
    """The sliding-window strides (equal width; HMT's compute) and every method's backbone positions per token."""
    hmt_cfg = hmt_config(settings, lora=False)
    seg = settings.segment_length
    hmt_ppt = positions_per_token(docs, lambda t: hmt_positions(t, hmt_cfg))
    strides = {"equal_width": settings.stride or seg // 2, "matched": matching_stride(docs, seg, hmt_ppt)}
    ppt = {
        "backbone_window": positions_per_token(docs, lambda t: window_positions(t, seg)),
        "lora": positions_per_token(docs, lambda t: window_positions(t, seg)),
        "backbone_sliding_matched": positions_per_token(docs, lambda t: sliding_positions(t, seg, strides["matched"])),
        "backbone_sliding": positions_per_token(docs, lambda t: sliding_positions(t, seg, strides["equal_width"])),
        "hmt": hmt_ppt,
        "hmt_lora": hmt_ppt,
    }
    log(f"HMT runs {hmt_ppt:.3f} backbone positions per scored token on these documents (nominal "
        f"{nominal_hmt_positions_per_token(hmt_cfg):.3f}); sliding-window strides {strides}")
    return strides, ppt


@torch.no_grad()
def score_windows(model, documents: Sequence[Sequence[int]], window: int) -> dict:
    """``model`` (any causal LM, here backbone + LoRA) over independent windows of ``window`` tokens, scored as
    `hmt_adapter.evaluation` scores its ``backbone_window`` baseline (loss by segment of ``window`` tokens)."""
    model.eval()
    result = MethodResult()
    for doc in documents:
        result.add(backbone_window_nll(model, torch.tensor(doc, dtype=torch.long), window), window)
    return result.to_dict()


def train_and_score(name: str, backbone_dir: str, tokenizer, dataset, docs, settings: QualitySettings, strides,
                    work_dir: str, log: Callable[[str], None]) -> tuple[dict, dict]:
    """Train one method (``hmt``, ``hmt_lora`` or ``lora``) and score it; the ``hmt`` pass also scores the backbone
    baselines (its adapter disabled). Returns ({method: scores}, training record)."""
    base = load_backbone(backbone_dir)
    seg = settings.segment_length
    if name == "lora":
        model, collator = lora_only_model(base, settings), window_collator(tokenizer.pad_token_id, seg)
    else:
        model, collator = peft.get_peft_model(base, hmt_config(settings, lora=name == "hmt_lora")), None
    trainable, total = model.get_nb_trainable_parameters()
    log(f"{name}: {trainable:,} trainable of {total:,}; SFTTrainer {settings.hmt_steps} steps x {settings.hmt_batch} "
        f"pieces" + (f" cut into {seg}-token windows" if collator else ""))
    t0 = time.perf_counter()
    trainer = train_adapter(model, tokenizer, dataset, settings, os.path.join(work_dir, f"trainer-{name}"), collator)
    train_s = time.perf_counter() - t0
    log_history = [r for r in trainer.state.log_history if "loss" in r]
    log(f"{name} trained ({train_s:.0f}s, last logged loss {log_history[-1]['loss'] if log_history else float('nan'):.3f}); "
        f"scoring {len(docs)} held-out documents")
    t0 = time.perf_counter()
    if name == "lora":
        scores = {"lora": score_windows(model, docs, seg)}
    elif name == "hmt_lora":
        scores = {"hmt_lora": evaluate_long_documents(model, docs, methods=("hmt",)).to_dict()["methods"]["hmt"]}
    else:
        first = evaluate_long_documents(model, docs, stride=strides["equal_width"]).to_dict()["methods"]
        matched = evaluate_long_documents(model, docs, stride=strides["matched"], methods=("backbone_sliding",))
        scores = {**first, "backbone_sliding_matched": matched.to_dict()["methods"]["backbone_sliding"]}
    record = {"trainable_parameters": trainable, "total_parameters": total, "seconds": train_s,
              "eval_seconds": time.perf_counter() - t0, "log": log_history}
    if name == "lora":
        record["lora_target_modules"] = sorted(model.peft_config["default"].target_modules)
    return scores, record


def train_and_score_all(backbone, data: Data, docs, settings: QualitySettings, strides, log: Callable[[str], None]
                        ) -> tuple[dict[str, dict], dict[str, dict], dict[str, int]]:
    """Every method on the same frozen backbone (saved once, reloaded per method) and the same SFT pieces. Returns
    (scores by method in `ORDER`, training records, SFT piece counts)."""
    methods: dict[str, dict] = {}
    training: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        backbone_dir = os.path.join(tmp, "backbone")
        backbone.save_pretrained(backbone_dir)
        dataset, sft_available = sft_dataset(data.fit_tokens, settings)
        for name in ("hmt",) + (("hmt_lora", "lora") if settings.lora else ()):
            scores, training[name] = train_and_score(name, backbone_dir, data.tokenizer, dataset, docs, settings,
                                                     strides, tmp, log)
            methods.update(scores)
    methods = {m: methods[m] for m in ORDER if m in methods}
    counts = {m: r["num_targets"] for m, r in methods.items()}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"Methods scored different numbers of targets: {counts}")
    return methods, training, {"sft_pieces_available": sft_available, "sft_pieces_used": len(dataset)}


def corpus_record(data: Data, settings: QualitySettings, sft: dict[str, int]) -> dict[str, Any]:
    """The ``corpus`` block of the results: documents, characters and tokens of each split, and how it was cut."""
    return {
        "dir": settings.corpus_dir,
        "documents": len(data.paths),
        "train_documents": len(data.train_paths),
        "validation_documents": len(data.val_paths),
        "heldout_documents": len(data.heldout_paths),
        "train_characters": sum(map(len, data.train_texts)),
        "heldout_characters": sum(map(len, data.heldout_texts)),
        "pretrain_tokens": data.stream.numel(),
        "validation_tokens": data.val_stream.numel(),
        "heldout_tokens": sum(map(len, data.heldout_tokens)),
        "split": f"SHA-256 of the relative path, first 8 bytes / 2^64 < {settings.heldout_fraction} -> held-out; "
                 f"of the rest, SHA-256 of 'validation:' + path < {settings.validation_fraction} -> validation "
                 f"(pretraining's stopping rule only; not pretrained on, not in SFT)",
        **sft,
    }


def eval_record(docs, methods: dict, strides: dict[str, int], settings: QualitySettings) -> dict[str, Any]:
    """The ``eval`` block of the results: what was scored, at which widths and strides."""
    seg = settings.segment_length
    return {
        "documents": len(docs),
        "tokens_scored": methods["backbone_window"]["num_targets"],
        "document_tokens": sum(map(len, docs)),
        "segment_length": seg,
        "window": seg,
        "stride": strides["equal_width"],
        "stride_matched": strides["matched"],
        "recall_query": settings.recall_query,
        "width": "every backbone baseline and LoRA alone read windows of segment_length tokens (the backbone's "
                 "pretraining window), the number of new tokens HMT reads per segment pass; HMT's pass also holds "
                 f"2 memory slots and {settings.num_sensory} sensory tokens",
        "note": "recall_query='segment' (the paper's): the memory read at a segment's start is chosen with the "
                "first half of that segment (lookahead through the recall weights; values are past memories "
                "only)" if settings.recall_query == "segment" else "recall_query='previous': strictly causal",
    }


def backbone_record(pre: dict) -> dict[str, Any]:
    """The ``backbone`` block of the results: its size and how its pretraining went."""
    curve = pre["validation_curve"]
    return {"parameters": pre["parameters"], "pretrain_seconds": pre["seconds"], "pretrain_steps_run": pre["steps"],
            "stopped": pre["stopped"], "validation_curve": curve,
            "final_validation_loss": curve[-1]["validation_loss"],
            "pretrain_final_loss": sum(pre["losses"][-20:]) / max(1, len(pre["losses"][-20:])),
            "pretrain_loss_curve": pre["losses"][:: max(1, len(pre["losses"]) // 100)]}


def run(settings: QualitySettings, command: str, out_dir: Optional[Path] = None) -> dict:
    """The whole benchmark; returns the results dictionary (also written as JSON + PNG)."""
    start = time.perf_counter()
    log = O.logger(start)
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    data = load_data(settings, log)
    backbone, pre = pretrain(data, settings, log)
    docs = K.eval_documents(data.heldout_tokens, settings.segment_length, settings.eval_min_segments,
                            settings.eval_max_segments, settings.eval_max_documents)
    strides, ppt = accounting(docs, settings, log)
    methods, training, sft = train_and_score_all(backbone, data, docs, settings, strides, log)
    results = {
        "benchmark": "long-document LM quality on the Python 3.11 docs (Debian python3.11-doc *.rst.txt)",
        "command": command,
        "corpus": corpus_record(data, settings, sft),
        "eval": eval_record(docs, methods, strides, settings),
        "methods": methods,
        "positions_per_token": {m: ppt[m] for m in methods},  # backbone positions run per scored token
        "positions_per_token_note": "counted over the scored documents: segment + summary passes for HMT (real "
                                    "positions), the windows' total width for the sliding windows, T - 1 for windows",
        "hmt_nominal_positions_per_token": nominal_hmt_positions_per_token(hmt_config(settings, lora=False)),
        "comparisons": comparisons(methods),
        "backbone": backbone_record(pre),
        "training": training,
        "settings": asdict(settings),
        "versions": versions(),
        "wall_seconds": time.perf_counter() - start,
    }
    out_dir = out_dir or O.OUTPUT
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{settings.output_name}.json").write_text(json.dumps(results, indent=2))
    write_plot(results, out_dir / f"{settings.output_name}.png")
    print_table(results)
    print(markdown_table(results))
    log(f"wrote {out_dir / (settings.output_name + '.json')} and .png")
    return results


def make_parser() -> argparse.ArgumentParser:
    d = QualitySettings()
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke run (writes quality_quick.json/.png)")
    p.add_argument("--corpus-dir", default=d.corpus_dir)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help=f"torch CPU threads (default {d.threads}; quick: 1)")
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--hmt-steps", type=int, default=None)
    p.add_argument("--recall-query", choices=("segment", "previous"), default=None)
    p.add_argument("--table-from", metavar="JSON", default=None,
                   help="print the Markdown table of an existing results file and exit")
    p.add_argument("--plot-from", metavar="JSON", default=None,
                   help="redraw the PNG next to an existing results file (same name, .png) and exit")
    p.add_argument("--no-lora", action="store_true", help="skip HMT + LoRA and LoRA alone (the two LoRA rows)")
    O.add_output_arguments(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    if args.table_from:
        print(markdown_table(json.loads(Path(args.table_from).read_text())))
        return 0
    if args.plot_from:
        write_plot(json.loads(Path(args.plot_from).read_text()), Path(args.plot_from).with_suffix(".png"))
        return 0
    overrides: dict[str, Any] = {"corpus_dir": args.corpus_dir, "seed": args.seed}
    for key in ("threads", "pretrain_steps", "hmt_steps", "recall_query"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.no_lora:
        overrides["lora"] = False
    settings = quick_settings(**overrides) if args.quick else QualitySettings(**overrides)
    if not K.list_documents(settings.corpus_dir):
        print(K.missing_corpus_message(settings.corpus_dir), file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, settings.threads))
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    run(settings, O.quoted_command("python -m benchmarks.quality", argv), O.output_dir(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
