"""The ``hmt-adapter`` command line: ``train`` (recipes), ``eval`` (long-document perplexity) and ``demo``.

    hmt-adapter train recipes/tiny-offline.yaml [--flag value ...]
    hmt-adapter eval --adapter outputs/tiny-offline --data-files recipes/data/tiny_docs.jsonl \\
        --output eval.json --plot eval.png [--recall-histogram]
    hmt-adapter demo [...]

This module is the place where the package prints, draws progress bars and writes plots (house rule 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence


def make_parser() -> argparse.ArgumentParser:
    """The top-level parser; ``train`` and ``demo`` forward their remaining arguments to their own parsers."""
    parser = argparse.ArgumentParser(
        prog="hmt-adapter", description="Hierarchical Memory Transformer (HMT) adapters for Hugging Face causal LMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="Run a two-stage training recipe (YAML).", add_help=False,
        description="hmt-adapter train RECIPE.yaml [--any_recipe_or_SFTConfig_field value ...]",
    )
    train.add_argument("recipe", nargs="?", help="Recipe YAML file (see recipes/).")
    evaluate = sub.add_parser("eval", help="Long-document perplexity: adapter vs the backbone alone.")
    _add_eval_arguments(evaluate)
    sub.add_parser("demo", help="Offline demo: HMT gives a short-window model long memory.", add_help=False)
    return parser


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, help="Directory of a saved HMT adapter (save_pretrained / hmt-adapter train).")
    p.add_argument("--model", default=None, help="Backbone: Hub id, local dir or hmt-testing:<type> (default: from the adapter).")
    p.add_argument("--tokenizer", default=None, help="Tokenizer (default: the adapter directory's, else the model's).")
    p.add_argument("--data-files", default=None, help="Local .json/.jsonl/.txt/.parquet/.csv file(s), comma-separated.")
    p.add_argument("--dataset-name", default=None, help="Hub dataset id (e.g. Salesforce/wikitext).")
    p.add_argument("--dataset-config", default=None, help="Hub dataset config (e.g. wikitext-103-raw-v1).")
    p.add_argument("--split", default="test", help="Split of a Hub dataset (default: test).")
    p.add_argument("--text-field", default="text")
    p.add_argument("--concatenate", action="store_true", help="Join all rows into one document (Wikitext-style corpora).")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="Cut each document to this many tokens.")
    p.add_argument("--window", type=int, default=None, help="Backbone baseline window (default: segment_length).")
    p.add_argument("--stride", type=int, default=None, help="Sliding-window stride (default: window // 2).")
    p.add_argument("--no-sliding", action="store_true", help="Skip the (expensive) sliding-window baseline.")
    p.add_argument("--recall-histogram", action="store_true", help="Also record how far back recall looks.")
    p.add_argument("--dtype", default="float32", help="Backbone dtype: float32, bfloat16, float16.")
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: cuda if available).")
    p.add_argument("--output", default="hmt_eval.json", help="JSON results file.")
    p.add_argument("--plot", default="hmt_eval.png", help="PNG plot of loss by segment index ('' to skip).")


# ---- train ---------------------------------------------------------------------------------------------------
def cmd_train(argv: Sequence[str]) -> int:
    from hmt_adapter_cli.recipes import main as run

    if any(a in ("-h", "--help") for a in argv):
        from hmt_adapter_cli.recipes import make_parser as recipe_parser

        print("usage: hmt-adapter train RECIPE.yaml [--field value ...]\n")
        recipe_parser().print_help()
        return 0
    report = run(list(argv))
    if _is_main_process():
        print(f"training processes: {report['world_size']}")
        for stage in ("stage1", "stage2"):
            if stage in report:
                losses = report[stage]["losses"]
                first, last = (f"{losses[0]:.4f}", f"{losses[-1]:.4f}") if losses else ("-", "-")
                print(f"{stage}: {len(losses)} logged steps, loss {first} -> {last}; adapter in {report[stage]['dir']}")
        if "stage2_init" in report:
            print(f"stage 2 started from stage 1 ({report['stage2_init']['loaded']} tensors; fresh recall parameters: "
                  f"{len(report['stage2_init']['fresh_recall_params'])})")
    return 0


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


# ---- eval ----------------------------------------------------------------------------------------------------
def _load_for_eval(args: argparse.Namespace):
    import peft
    import torch
    from transformers import AutoTokenizer

    from hmt_adapter.config import HMTConfig
    from hmt_adapter_cli.recipes import ModelArguments, load_model_and_tokenizer

    config = HMTConfig.from_pretrained(args.adapter)
    model_name = args.model or config.base_model_name_or_path
    if not model_name:
        raise ValueError(f"The adapter {args.adapter!r} does not name its base model: pass --model.")
    model_args = ModelArguments(model_name_or_path=model_name, model_dtype=args.dtype, load_in_4bit=args.load_in_4bit)
    base, tokenizer = load_model_and_tokenizer(model_args)
    tokenizer_path = args.tokenizer or (args.adapter if os.path.isfile(os.path.join(args.adapter, "tokenizer_config.json")) else None)
    if tokenizer_path:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.load_in_4bit:
        base = base.to(device)
    model = peft.PeftModel.from_pretrained(base, args.adapter)
    return model, tokenizer


def _documents(args: argparse.Namespace, tokenizer: Any) -> list[list[int]]:
    from hmt_adapter_cli.recipes import DataArguments, load_documents, tokenize_documents

    data = DataArguments(
        dataset_name=args.dataset_name, dataset_config=args.dataset_config, data_files=args.data_files,
        text_field=args.text_field, max_train_documents=args.max_documents,
    )
    docs = tokenize_documents(load_documents(data, split=args.split), tokenizer, args.concatenate)
    if args.max_tokens:
        docs = [d[: args.max_tokens] for d in docs]
    return [d for d in docs if len(d) >= 2]


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from hmt_adapter.evaluation import METHODS, evaluate_long_documents

    model, tokenizer = _load_for_eval(args)
    docs = _documents(args, tokenizer)
    if not docs:
        raise ValueError("No document with at least 2 tokens to evaluate.")
    methods = [m for m in METHODS if not (args.no_sliding and m == "backbone_sliding")]
    result = evaluate_long_documents(
        model, docs, window=args.window, stride=args.stride, methods=methods,
        recall_histogram=args.recall_histogram, progress=lambda it: tqdm(it, total=len(docs), desc="documents"),
    )
    out = result.to_dict()
    out.update(adapter=args.adapter, num_tokens=sum(len(d) for d in docs))
    with open(args.output, "w") as f:
        json.dump(out, f, indent=2)
    for name, m in out["methods"].items():
        print(f"{name:>17}: loss {m['loss']:.4f}  ppl {m['perplexity']:.3f}  ({m['num_targets']} tokens)")
    print(f"results: {args.output}")
    if args.plot:
        plot_eval(out, args.plot)
        print(f"plot: {args.plot}")
    return 0


def plot_eval(result: dict, path: str) -> None:
    """Loss by segment index per method (and the recall-distance histogram when present) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = result.get("recall_distance_mean_weight")
    fig, axes = plt.subplots(1, 2 if hist else 1, figsize=(11 if hist else 6, 4), squeeze=False)
    ax = axes[0][0]
    labels = {"hmt": "HMT", "backbone_window": f"backbone, windows of {result['window']}",
              "backbone_sliding": f"backbone, sliding {result['window']}/{result['stride']}"}
    for name, m in result["methods"].items():
        ax.plot(range(len(m["segment_loss"])), m["segment_loss"], marker="o", ms=3, label=f"{labels.get(name, name)} (ppl {m['perplexity']:.2f})")
    ax.set_xlabel(f"segment index ({result['segment_length']} tokens each)")
    ax.set_ylabel("mean next-token loss")
    ax.set_title("Loss by segment index")
    ax.legend(fontsize=8)
    if hist:
        ax2 = axes[0][1]
        ax2.bar(range(1, len(hist) + 1), hist)
        ax2.set_xlabel("recall distance (segments back)")
        ax2.set_ylabel("mean recall weight when available")
        ax2.set_title("How far back recall looks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- demo ----------------------------------------------------------------------------------------------------
def cmd_demo(argv: Sequence[str]) -> int:
    from .demo import main as demo_main  # imported lazily: the demo is optional and heavy

    result = demo_main(list(argv))
    return result if isinstance(result, int) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``hmt-adapter`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    command = argv[0] if argv else None
    try:
        if command == "train":
            return cmd_train(argv[1:])
        if command == "demo":
            return cmd_demo(argv[1:])
        return cmd_eval(parser.parse_args(argv))
    except (ValueError, TypeError) as exc:  # user errors: a message, not a stack trace
        parser.exit(2, f"hmt-adapter {command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
