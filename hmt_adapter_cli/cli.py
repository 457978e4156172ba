"""The ``hmt-adapter`` command line: ``train`` (recipes), ``eval`` (long-document perplexity) and ``demo``.

    hmt-adapter train recipes/tiny-offline.yaml [--flag value ...]
    hmt-adapter eval --adapter outputs/tiny-offline --data-files recipes/data/tiny_docs.jsonl [--recall-histogram]
    hmt-adapter demo [...]
    hmt-adapter lm-eval --model hmt --model_args pretrained=BASE,peft=ADAPTER --tasks ...   (lm-eval's arguments)
    hmt-adapter --version

This module is the place where the package prints, draws progress bars and writes plots (house rule 1). It imports
no framework at module level: help and mistakes in arguments are answered before torch, transformers, TRL or PEFT
are imported (each command imports them when its work starts). Every flag takes both spellings, ``--data-files``
and ``--data_files``, as HF's and TRL's parsers do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

from .arguments import OneLineParser, normalize_flags
from .quiet import silence_third_party_notices


def make_parser() -> argparse.ArgumentParser:
    """The top-level parser; ``train`` and ``demo`` forward their remaining arguments to their own parsers."""
    parser = OneLineParser(
        prog="hmt-adapter", description="Hierarchical Memory Transformer (HMT) adapters for Hugging Face causal LMs. "
        "Flags take both spellings: --data-files or --data_files.",
    )
    parser.add_argument("--version", action="version", version=f"hmt-adapter {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="Run a training recipe (YAML): two stages on text, one on prompt/completion rows.", add_help=False,
        description="hmt-adapter train RECIPE.yaml [--any_recipe_or_SFTConfig_field value ...]",
    )
    train.add_argument("recipe", nargs="?", help="Recipe YAML file (see recipes/).")
    evaluate = sub.add_parser("eval", help="Long-document perplexity: adapter vs the backbone alone.",
                              description="Long-document perplexity: adapter vs the backbone alone. Flags take both "
                              "spellings (--data-files or --data_files).")
    _add_eval_arguments(evaluate)
    parser.eval_parser = evaluate  # main() parses `eval` with it directly, so its errors name `hmt-adapter eval`
    sub.add_parser("demo", help="Offline demo: HMT gives a short-window model long memory.", add_help=False)
    sub.add_parser("lm-eval", help="lm-evaluation-harness with the 'hmt' model (takes lm-eval's arguments).",
                   add_help=False)
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
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--output-dir", default="hmt-eval-output",
                   help="Where results.json and loss.png go (default: %(default)s, in the working directory).")
    p.add_argument("--no-plot", action="store_true", help="Skip the PNG plot.")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hmt-adapter")
    except PackageNotFoundError:
        return "unknown (not installed)"


# ---- train ---------------------------------------------------------------------------------------------------
TRAIN_USAGE = "usage: hmt-adapter train RECIPE.yaml [--field value ...]   (recipes/ has examples; --help lists the fields)"


def _train_help(show_all: bool) -> str:
    """The recipe and HMT fields with their help and defaults first; SFTConfig's fields only with --help-all."""
    import dataclasses
    import textwrap

    from .arguments import PATH_RULE, RECIPE_DATACLASSES

    lines = [TRAIN_USAGE, "", *textwrap.wrap(f"Paths: {PATH_RULE}", 110, subsequent_indent="  "),
             "Flags take both spellings: --segment_length or --segment-length.",
             *textwrap.wrap("Data: text documents train the paper's two stages; prompt/completion rows (JSONL with "
                            "'prompt' and 'completion', e.g. recipes/retrieval-tiny.yaml) train ONE stage with recall "
                            "(stage 1 is skipped), loss on the completion only, rows never cut (data_format).", 110,
                            subsequent_indent="  "), ""]
    for dc in RECIPE_DATACLASSES:
        lines.append(f"{dc.__name__}: {(dc.__doc__ or '').strip().splitlines()[0]}")
        for f in dataclasses.fields(dc):
            default = f.default if f.default is not dataclasses.MISSING else None
            lines.append(f"  --{f.name} (default: {default!r})")
            if f.metadata.get("help"):
                lines.append(f"      {f.metadata['help']}")
        lines.append("")
    if not show_all:
        lines.append("Every field of TRL's SFTConfig is accepted too (--learning_rate, --per_device_train_batch_size, "
                     "--output_dir, ...): `hmt-adapter train --help-all` lists them.")
    return "\n".join(lines)


def cmd_train(argv: Sequence[str]) -> int:
    if "--help-all" in argv:
        from .recipes import make_parser as recipe_parser

        print(_train_help(show_all=True))
        recipe_parser().print_help()
        return 0
    if any(a in ("-h", "--help") for a in argv):
        print(_train_help(show_all=False))
        return 0
    if not argv or argv[0].startswith("-"):
        raise ValueError(f"no recipe given. {TRAIN_USAGE}")
    if not os.path.isfile(argv[0]):
        raise ValueError(f"recipe file {argv[0]!r} not found. {TRAIN_USAGE}")
    from .arguments import check_flag_values

    check_flag_values(argv[1:])  # before the frameworks are imported: a mistyped value answers at once
    from .recipes import check_hub_access, parse_recipe, run_recipe

    args = parse_recipe(argv[0], argv[1:])
    check_hub_access(args[0], args[1])
    if _is_main_process():
        print(f"hmt-adapter train: writing the adapter to {os.path.abspath(args[4].output_dir)}", flush=True)
    report = run_recipe(*args)
    if _is_main_process():
        print(f"training processes: {report['world_size']}")
        names = {"stage1": "stage1", "stage2": "stage2", "prompt_completion": "prompt/completion, one stage with recall"}
        for stage, name in names.items():
            if stage in report:
                losses = report[stage]["losses"]
                first, last = (f"{losses[0]:.4f}", f"{losses[-1]:.4f}") if losses else ("-", "-")
                print(f"{name}: {len(losses)} logged steps, loss {first} -> {last}; adapter in {report[stage]['dir']}")
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

    from hmt_adapter.tuner.config import HMTConfig
    from hmt_adapter_cli.hub import HubSource, check_hub_sources
    from hmt_adapter_cli.recipes import ModelArguments, load_model_and_tokenizer

    config = HMTConfig.from_pretrained(args.adapter)
    model_name = args.model or config.base_model_name_or_path
    if not model_name:
        raise ValueError(f"The adapter {args.adapter!r} does not name its base model: pass --model.")
    sources = [HubSource("--model", model_name, "model", "--model /path/to/model")]
    if args.tokenizer:
        sources.append(HubSource("--tokenizer", args.tokenizer, "model", "--tokenizer /path/to/tokenizer"))
    if args.dataset_name and not args.data_files:
        sources.append(HubSource("--dataset-name", args.dataset_name, "dataset", "--data-files /path/to/docs.jsonl"))
    check_hub_sources(sources)
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

    if not args.data_files and not args.dataset_name:
        raise ValueError("no data: pass --data-files FILE (local .json/.jsonl/.txt/.parquet/.csv) or --dataset-name ID (Hub).")
    for path in (p.strip() for p in (args.data_files or "").split(",") if p.strip()):
        if not os.path.isfile(path):
            raise ValueError(f"--data-files: {path!r} not found.")
    data = DataArguments(
        dataset_name=args.dataset_name, dataset_config=args.dataset_config, data_files=args.data_files,
        text_field=args.text_field, max_train_documents=args.max_documents,
    )
    docs = tokenize_documents(load_documents(data, split=args.split), tokenizer, args.concatenate)
    if args.max_tokens:
        docs = [d[: args.max_tokens] for d in docs]
    return [d for d in docs if len(d) >= 2]


def cmd_eval(args: argparse.Namespace) -> int:
    if not os.path.isdir(args.adapter):
        raise ValueError(f"--adapter: {args.adapter!r} is not a directory (expected one written by save_pretrained).")
    from tqdm import tqdm

    from hmt_adapter.evaluation import METHODS, evaluate_long_documents

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tokenizer = _load_for_eval(args)
    docs = _documents(args, tokenizer)
    if not docs:
        raise ValueError(f"No document with at least 2 tokens to evaluate in {args.data_files or args.dataset_name!r}.")
    methods = [m for m in METHODS if not (args.no_sliding and m == "backbone_sliding")]
    result = evaluate_long_documents(
        model, docs, window=args.window, stride=args.stride, methods=methods,
        recall_histogram=args.recall_histogram, progress=lambda it: tqdm(it, total=len(docs), desc="documents"),
    )
    out = result.to_dict()
    out.update(adapter=args.adapter, num_tokens=sum(len(d) for d in docs))
    os.makedirs(args.output_dir, exist_ok=True)
    results = os.path.abspath(os.path.join(args.output_dir, "results.json"))
    with open(results, "w") as f:
        json.dump(out, f, indent=2)
    for name, m in out["methods"].items():
        print(f"{name:>17}: loss {m['loss']:.4f}  ppl {m['perplexity']:.3f}  ({m['num_targets']} tokens)")
    print(f"results: {results}")
    if not args.no_plot:
        plot_eval(out, os.path.join(args.output_dir, "loss.png"))
        print(f"plot: {os.path.abspath(os.path.join(args.output_dir, 'loss.png'))}")
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
    silence_third_party_notices()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    command = argv[0] if argv else None
    try:
        if command == "train":
            return cmd_train(argv[1:])
        if command == "demo":
            return cmd_demo(argv[1:])
        if command == "lm-eval":
            from .lm_eval_cli import main as lm_eval_main

            return lm_eval_main(argv[1:])
        if command == "eval":
            return cmd_eval(parser.eval_parser.parse_args(normalize_flags(argv[1:])))
        parser.parse_args(argv)  # --help, --version, no or an unknown command: argparse answers and exits
        return 2
    except (ValueError, TypeError, FileNotFoundError) as exc:  # user errors: one line, not a stack trace
        parser.exit(2, f"hmt-adapter {command}: error: {_one_line(exc)}\n")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 600 else text[:600] + " ..."


if __name__ == "__main__":
    sys.exit(main())
