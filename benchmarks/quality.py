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
2. a small Llama (``LlamaConfig``) pretrained from scratch on short windows of ``segment_length`` tokens of the
   training split (plain torch loop, AdamW, warm-up + cosine): the backbone;
3. the backbone frozen, HMT attached with ``peft.get_peft_model(backbone, HMTConfig(...))``, the HMT parameters
   trained with TRL's ``SFTTrainer`` on training documents cut into pieces of ``train_segments`` segments
   (`hmt_adapter.training.chunk_token_ids`, ``max_length`` checked with `check_max_length`);
4. optionally HMT + LoRA (``HMTConfig(lora_r=8, lora_alpha=32)``) trained the same way for the same steps;
5. held-out documents scored with `hmt_adapter.evaluation.evaluate_long_documents`: HMT, the backbone over
   independent windows of ``segment_length`` tokens, and the backbone over a sliding window of the same width
   (stride ``segment_length // 2``). The same tokens are scored by every method.

Run (from the repository root)::

    python -m benchmarks.quality            # full run (~15-25 min on 2 shared CPU cores)
    python -m benchmarks.quality --lora     # also HMT + LoRA
    python -m benchmarks.quality --quick    # smoke run (a minute or two)

Outputs: ``quality.json`` and ``quality.png`` in ``--output-dir`` (default benchmarks/output; ``--update-results``: benchmarks/results) (``--quick`` writes
``quality_quick.*``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from benchmarks import _common as C

CORPUS_DIR = "/usr/share/doc/python3.11/html/_sources"
INSTALL_COMMAND = "apt-get install -y python3-doc"
SUFFIX = ".rst.txt"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


@dataclass
class QualitySettings:
    """Every knob of the benchmark; the defaults are the full run reported in BENCHMARKS.md."""

    corpus_dir: str = CORPUS_DIR
    heldout_fraction: float = 0.15
    seed: int = 0
    threads: int = 2
    # tokenizer
    vocab_size: int = 4096
    # backbone
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    segment_length: int = 128  # the backbone's training window = HMT's segment length = the baselines' width
    pretrain_steps: int = 300
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    # HMT
    num_sensory: int = 16
    recall_dim: int = 256
    recall_window: int = 300
    recall_query: str = "segment"
    hmt_steps: int = 300
    hmt_batch: int = 2
    hmt_lr: float = 2e-3
    train_segments: int = 8  # training pieces: documents cut into pieces of train_segments * segment_length
    gradient_checkpointing: bool = False  # tiny model: memory is no issue, recomputation would cost ~30% time
    lora: bool = False  # (--lora) also train HMT + LoRA (lora_r=8, lora_alpha=32)
    lora_r: int = 8
    lora_alpha: int = 32
    # evaluation
    eval_max_segments: int = 24  # each held-out document is scored on its first eval_max_segments segments
    eval_min_segments: int = 2  # held-out documents shorter than this many segments are skipped
    eval_max_documents: int = 0  # 0: all held-out documents long enough
    stride: int = 0  # sliding-window stride; 0: segment_length // 2
    output_name: str = "quality"


def quick_settings(**overrides: Any) -> QualitySettings:
    """Tiny settings for a smoke run: a small model, few steps, few documents."""
    base = dict(
        hidden_size=64, num_layers=2, num_heads=2, vocab_size=1024, segment_length=32, pretrain_steps=30,
        pretrain_batch=8, num_sensory=4, recall_dim=32, hmt_steps=6, hmt_batch=2, train_segments=4,
        eval_max_segments=6, eval_max_documents=4, output_name="quality_quick", threads=1,
    )
    base.update(overrides)
    return QualitySettings(**base)


# ---------------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------------
def missing_corpus_message(corpus_dir: str) -> str:
    return (
        f"The corpus directory {corpus_dir!r} has no *{SUFFIX} files. It comes from Debian's python3.11-doc "
        f"package; install it with:\n\n    {INSTALL_COMMAND}\n\n(or pass --corpus-dir pointing at a directory of "
        f"*{SUFFIX} files)."
    )


def list_documents(root: str, suffix: str = SUFFIX) -> list[str]:
    """Paths (relative to ``root``, '/'-separated, sorted) of every ``*suffix`` file under ``root``."""
    base = Path(root)
    if not base.is_dir():
        return []
    return sorted(p.relative_to(base).as_posix() for p in base.rglob(f"*{suffix}") if p.is_file())


def is_heldout(relative_path: str, heldout_fraction: float) -> bool:
    """Deterministic split: the first 8 bytes of SHA-256(path) as a number in [0, 1) below the fraction."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def split_documents(paths: Sequence[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(training paths, held-out paths), each in the order of ``paths``."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}.")
    train = [p for p in paths if not is_heldout(p, heldout_fraction)]
    heldout = [p for p in paths if is_heldout(p, heldout_fraction)]
    return train, heldout


def read_documents(root: str, paths: Sequence[str]) -> list[str]:
    return [(Path(root) / p).read_text(encoding="utf-8", errors="replace") for p in paths]


def eval_documents(token_docs: Sequence[Sequence[int]], segment_length: int, min_segments: int,
                   max_segments: int, max_documents: int = 0) -> list[list[int]]:
    """Held-out documents to score: those of at least ``min_segments`` full segments, each cut to its first
    ``max_segments * segment_length`` tokens, at most ``max_documents`` of them (0: all), in the given order."""
    out = []
    for doc in token_docs:
        if len(doc) < min_segments * segment_length:
            continue
        out.append(list(doc[: max_segments * segment_length]))
        if max_documents and len(out) == max_documents:
            break
    return out


# ---------------------------------------------------------------------------------------------------------
# Tokenizer and backbone
# ---------------------------------------------------------------------------------------------------------
def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_backbone(settings: QualitySettings, vocab_size: int):
    """A small Llama from a config (tied embeddings), float32, in train mode."""
    return C.llama(
        vocab_size, settings.hidden_size, settings.num_layers, settings.num_heads,
        (settings.hidden_size * 8 // 3 + 31) // 32 * 32, 4 * settings.segment_length, True,
        seed=settings.seed, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def pretrain_backbone(model, stream: torch.Tensor, settings: QualitySettings) -> list[float]:
    """Train on random windows of ``segment_length`` tokens of the concatenated training split. Returns losses."""
    gen = torch.Generator().manual_seed(settings.seed + 1)
    window = settings.segment_length
    optim = torch.optim.AdamW(model.parameters(), lr=settings.pretrain_lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, settings.pretrain_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, settings.pretrain_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    model.train()
    losses = []
    for _ in range(settings.pretrain_steps):
        starts = torch.randint(0, stream.numel() - window, (settings.pretrain_batch,), generator=gen)
        ids = torch.stack([stream[s : s + window] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    model.requires_grad_(False)
    return losses


# ---------------------------------------------------------------------------------------------------------
# HMT training with TRL
# ---------------------------------------------------------------------------------------------------------
def hmt_config(settings: QualitySettings, lora: bool):
    from hmt_adapter import HMTConfig

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
    from datasets import Dataset

    from hmt_adapter.training import chunk_token_ids

    chunks = chunk_token_ids(train_token_docs, settings.train_segments * settings.segment_length,
                             min_tokens=2 * settings.segment_length)
    wanted = settings.hmt_steps * settings.hmt_batch  # each piece seen at most once
    available = len(chunks)
    if available > wanted:
        chunks = random.Random(settings.seed + 2).sample(chunks, wanted)
    return Dataset.from_dict({"input_ids": chunks}), available


def train_hmt(peft_model, tokenizer, dataset, settings: QualitySettings, work_dir: str):
    """Train the adapter's parameters with TRL's SFTTrainer. Returns the trainer."""
    from trl import SFTConfig, SFTTrainer

    from hmt_adapter.training import check_max_length, check_sft_args

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
    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    peft_model.eval()
    return trainer


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------
LABELS = {
    "hmt": "frozen backbone + HMT",
    "hmt_lora": "backbone + HMT + LoRA",
    "backbone_window": "backbone, independent windows",
    "backbone_sliding": "backbone, sliding window",
}


def write_plot(results: dict, path: Path) -> None:
    """Loss by segment index per method (left) and perplexity per method (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    seg = results["settings"]["segment_length"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for name, res in methods.items():
        # segments scored in at least 5 documents' worth of targets
        keep = [i for i, c in enumerate(res["segment_count"]) if c >= 5 * seg]
        ax.plot(keep, [res["segment_loss"][i] for i in keep], marker=".", label=LABELS.get(name, name))
    ax.set_xlabel(f"segment index (segment = {seg} tokens)")
    ax.set_ylabel("mean NLL (nats / token)")
    ax.set_title("Held-out loss by segment index")
    ax.legend()
    names = list(methods)
    ppl = [methods[n]["perplexity"] for n in names]
    bars = bx.bar(range(len(names)), ppl, color=[f"C{i}" for i in range(len(names))])
    bx.bar_label(bars, fmt="%.2f")
    bx.set_xticks(range(len(names)), [LABELS.get(n, n).replace(", ", "\n").replace(" + ", "\n+ ") for n in names],
                  fontsize=8)
    bx.set_ylabel("perplexity")
    bx.set_ylim(min(ppl) * 0.9, max(ppl) * 1.05)
    bx.set_title(f"Held-out perplexity ({results['eval']['tokens_scored']:,} tokens)")
    fig.suptitle("Python 3.11 docs (Debian python3.11-doc): small Llama, frozen, window "
                 f"{seg}; recall_query={results['settings']['recall_query']!r}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(results: dict) -> None:
    methods = results["methods"]
    window = methods["backbone_window"]["perplexity"]
    header = f"{'method':<32} | {'loss':>7} | {'ppl':>8} | {'vs windows':>10} | {'compute':>8}"
    print(f"\nHeld-out: {results['eval']['documents']} documents, {results['eval']['tokens_scored']:,} targets each method")
    print(header)
    print("-" * len(header))
    for name, res in methods.items():
        rel = 100 * (res["perplexity"] / window - 1)
        print(f"{LABELS.get(name, name):<32} | {res['loss']:7.4f} | {res['perplexity']:8.3f} | {rel:+9.1f}% | "
              f"{results['relative_compute'][name]:7.2f}x")
    print(flush=True)


def markdown_table(results: dict) -> str:
    """The results table and the headline comparisons as Markdown (for BENCHMARKS.md)."""
    methods = results["methods"]
    window = methods["backbone_window"]["perplexity"]
    sliding = methods["backbone_sliding"]["perplexity"]
    lines = [
        f"Held-out: {results['eval']['documents']} documents, {results['eval']['tokens_scored']:,} scored tokens per "
        f"method (the same tokens for all); recall_query={results['eval']['recall_query']!r}.",
        "",
        "| method | loss (nats/token) | perplexity | vs independent windows | vs sliding window | backbone positions per token |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, res in methods.items():
        lines.append(
            f"| {LABELS.get(name, name)} | {res['loss']:.4f} | {res['perplexity']:.3f} | "
            f"{100 * (res['perplexity'] / window - 1):+.1f}% | {100 * (res['perplexity'] / sliding - 1):+.1f}% | "
            f"{results['relative_compute'][name]:.2f}x |"
        )
    return "\n".join(lines)


def versions() -> dict[str, Any]:
    import datasets
    import peft
    import tokenizers
    import transformers
    import trl

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
# The benchmark
# ---------------------------------------------------------------------------------------------------------
def _step(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def run(settings: QualitySettings, command: str, out_dir: Optional[Path] = None) -> dict:
    """The whole benchmark; returns the results dictionary (also written as JSON + PNG)."""
    import peft

    import hmt_adapter  # noqa: F401  (registers the HMT adapter type with PEFT)
    from hmt_adapter.evaluation import evaluate_long_documents

    start = time.perf_counter()
    random.seed(settings.seed)
    torch.manual_seed(settings.seed)
    paths = list_documents(settings.corpus_dir)
    if not paths:
        raise SystemExit(missing_corpus_message(settings.corpus_dir))
    train_paths, heldout_paths = split_documents(paths, settings.heldout_fraction)
    train_texts = read_documents(settings.corpus_dir, train_paths)
    heldout_texts = read_documents(settings.corpus_dir, heldout_paths)
    _step(f"corpus {settings.corpus_dir}: {len(paths)} documents, {len(train_paths)} train / {len(heldout_paths)} "
          f"held-out", start)

    tokenizer = train_tokenizer(train_texts, settings.vocab_size)
    train_tokens = _encode(tokenizer, train_texts)
    heldout_tokens = _encode(tokenizer, heldout_texts)
    stream = torch.tensor([t for doc in train_tokens for t in doc], dtype=torch.long)
    _step(f"tokenizer: vocab {len(tokenizer)}; train {stream.numel():,} tokens "
          f"({sum(map(len, train_texts)) / stream.numel():.2f} chars/token), held-out "
          f"{sum(map(len, heldout_tokens)):,} tokens", start)

    backbone = build_backbone(settings, len(tokenizer))
    n_params = sum(p.numel() for p in backbone.parameters())
    _step(f"pretraining a {n_params:,}-parameter Llama on {settings.segment_length}-token windows "
          f"({settings.pretrain_steps} steps x {settings.pretrain_batch})", start)
    t0 = time.perf_counter()
    losses = pretrain_backbone(backbone, stream, settings)
    pretrain_s = time.perf_counter() - t0
    _step(f"backbone trained: final loss {sum(losses[-20:]) / len(losses[-20:]):.3f} ({pretrain_s:.0f}s)", start)

    with tempfile.TemporaryDirectory() as tmp:
        backbone_dir = os.path.join(tmp, "backbone")
        backbone.save_pretrained(backbone_dir)
        dataset, sft_available = sft_dataset(train_tokens, settings)
        docs = eval_documents(heldout_tokens, settings.segment_length, settings.eval_min_segments,
                              settings.eval_max_segments, settings.eval_max_documents)
        stride = settings.stride or settings.segment_length // 2

        variants = [("hmt", False)] + ([("hmt_lora", True)] if settings.lora else [])
        methods: dict[str, dict] = {}
        training: dict[str, dict] = {}
        eval_meta: dict[str, Any] = {}
        for name, lora in variants:
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(backbone_dir, dtype=torch.float32)
            base.requires_grad_(False)
            model = peft.get_peft_model(base, hmt_config(settings, lora))
            trainable, total = model.get_nb_trainable_parameters()
            _step(f"{name}: {trainable:,} trainable of {total:,}; SFTTrainer {settings.hmt_steps} steps x "
                  f"{settings.hmt_batch} on {len(dataset)} of {sft_available} pieces of 2-{settings.train_segments} segments", start)
            t0 = time.perf_counter()
            trainer = train_hmt(model, tokenizer, dataset, settings, os.path.join(tmp, f"trainer-{name}"))
            train_s = time.perf_counter() - t0
            log = [r for r in trainer.state.log_history if "loss" in r]
            training[name] = {"trainable_parameters": trainable, "total_parameters": total, "seconds": train_s,
                              "log": log}
            _step(f"{name} trained ({train_s:.0f}s, last logged loss {log[-1]['loss'] if log else float('nan'):.3f}); "
                  f"evaluating {len(docs)} held-out documents", start)
            t0 = time.perf_counter()
            wanted = ("hmt", "backbone_window", "backbone_sliding") if name == "hmt" else ("hmt",)
            result = evaluate_long_documents(model, docs, stride=stride, methods=wanted).to_dict()
            eval_s = time.perf_counter() - t0
            methods[name] = result["methods"]["hmt"]
            for baseline in wanted[1:]:
                methods[baseline] = result["methods"][baseline]
            training[name]["eval_seconds"] = eval_s
            eval_meta = {k: result[k] for k in ("segment_length", "window", "stride", "recall_query", "use_recall")}
            del model, base, trainer

    order = [m for m in ("backbone_window", "backbone_sliding", "hmt", "hmt_lora") if m in methods]
    methods = {m: methods[m] for m in order}
    counts = {m: r["num_targets"] for m, r in methods.items()}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"Methods scored different numbers of targets: {counts}")
    seg, num_s = settings.segment_length, settings.num_sensory
    hmt_positions = (seg + num_s + 2 + math.ceil(seg * 0.5) + 2) / seg  # segment pass + summary-query pass
    results = {
        "benchmark": "long-document LM quality on the Python 3.11 docs (Debian python3.11-doc *.rst.txt)",
        "command": command,
        "corpus": {
            "dir": settings.corpus_dir,
            "documents": len(paths),
            "train_documents": len(train_paths),
            "heldout_documents": len(heldout_paths),
            "train_characters": sum(map(len, train_texts)),
            "heldout_characters": sum(map(len, heldout_texts)),
            "train_tokens": stream.numel(),
            "heldout_tokens": sum(map(len, heldout_tokens)),
            "split": f"SHA-256 of the relative path, first 8 bytes / 2^64 < {settings.heldout_fraction} -> held-out",
            "sft_pieces_available": sft_available,
            "sft_pieces_used": len(dataset),
        },
        "eval": {
            "documents": len(docs),
            "tokens_scored": counts["backbone_window"],
            "document_tokens": sum(map(len, docs)),
            **eval_meta,
            "note": "recall_query='segment' (the paper's): the memory read at a segment's start is chosen with the "
                    "first half of that segment (lookahead through the recall weights; values are past memories "
                    "only)" if settings.recall_query == "segment" else "recall_query='previous': strictly causal",
        },
        "methods": methods,
        "relative_compute": {  # backbone positions per scored token, relative to independent windows
            "backbone_window": 1.0,
            "backbone_sliding": seg / stride,
            "hmt": hmt_positions,
            "hmt_lora": hmt_positions,
        },
        "backbone": {"parameters": n_params, "pretrain_seconds": pretrain_s,
                     "pretrain_final_loss": sum(losses[-20:]) / len(losses[-20:]),
                     "pretrain_loss_curve": losses[:: max(1, len(losses) // 50)]},
        "training": training,
        "settings": asdict(settings),
        "versions": versions(),
        "wall_seconds": time.perf_counter() - start,
    }
    results["relative_compute"] = {m: results["relative_compute"][m] for m in methods}
    out_dir = out_dir or C.OUTPUT
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{settings.output_name}.json").write_text(json.dumps(results, indent=2))
    write_plot(results, out_dir / f"{settings.output_name}.png")
    print_table(results)
    print(markdown_table(results))
    _step(f"wrote {out_dir / (settings.output_name + '.json')} and .png", start)
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
    p.add_argument("--lora", action="store_true", help="also train and score HMT + LoRA (adds ~8 min on 2 cores)")
    C.add_output_arguments(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    if args.table_from:
        print(markdown_table(json.loads(Path(args.table_from).read_text())))
        return 0
    overrides: dict[str, Any] = {"corpus_dir": args.corpus_dir, "seed": args.seed}
    for key in ("threads", "pretrain_steps", "hmt_steps", "recall_query"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.lora:
        overrides["lora"] = True
    settings = quick_settings(**overrides) if args.quick else QualitySettings(**overrides)
    if not list_documents(settings.corpus_dir):
        print(missing_corpus_message(settings.corpus_dir), file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, settings.threads))
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    command = "python -m benchmarks.quality" + ("".join(" " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])))
    run(settings, command, C.output_dir(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
