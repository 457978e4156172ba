"""Share a trained HMT adapter on the Hugging Face Hub (adapter weights only, a few MB).

    hmt-adapter train recipes/tiny-offline.yaml --output_dir /tmp/hmt-tiny    # the README's tiny recipe
    python examples/push_to_hub.py --adapter /tmp/hmt-tiny                    # offline dry run of that adapter
    python examples/push_to_hub.py --adapter outputs/opt-350m-wikitext103 \
        --base facebook/opt-350m --repo-id you/opt-350m-hmt-wikitext103 --push

(``hmt-adapter train recipes/opt-350m-wikitext103.yaml`` writes its adapter to outputs/opt-350m-wikitext103.)
Without --push everything runs offline up to the upload: the adapter is loaded onto its base model, checked to
run, and `save_pretrained` writes exactly what `push_to_hub` would send (adapter_config.json +
adapter_model.safetensors) into --staging-dir. With --push (needs `huggingface-cli login` or HF_TOKEN) the same
files are uploaded with `model.push_to_hub(repo_id)`. Users then load it with

    import hmt_adapter, peft
    model = peft.AutoPeftModelForCausalLM.from_pretrained("you/opt-350m-hmt-wikitext103")
"""

from __future__ import annotations

import argparse
import os
import sys


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", required=True, help="Directory of a saved HMT adapter.")
    p.add_argument("--base", default="hmt-testing:llama", help="Base model (Hub id, dir, or hmt-testing:<type>).")
    p.add_argument("--repo-id", default="your-username/hmt-adapter", help="Hub repository to push to.")
    p.add_argument("--staging-dir", default="outputs/push-staging",
                   help="Where the files to push are written (default: %(default)s, in the working directory).")
    p.add_argument("--private", action="store_true")
    p.add_argument("--push", action="store_true", help="Really upload (otherwise stop before the network).")
    return p


def check_inputs(args: argparse.Namespace) -> None:
    """The adapter folder exists and the base model can be loaded, before anything heavy is imported or fetched."""
    from hmt_adapter_cli.hub import HubSource, check_hub_sources

    if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        what = "has no adapter_config.json" if os.path.isdir(args.adapter) else "does not exist"
        raise ValueError(
            f"--adapter {args.adapter!r} {what}: pass a folder written by save_pretrained, e.g. train one with "
            "`hmt-adapter train recipes/tiny-offline.yaml --output_dir /tmp/hmt-tiny` and pass --adapter /tmp/hmt-tiny."
        )
    check_hub_sources([HubSource("--base", args.base, "model", "--base /path/to/model")])


def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    try:
        check_inputs(args)
    except ValueError as exc:  # a mistake in the arguments: one line, no traceback
        print(f"push_to_hub.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    import peft
    import torch

    import hmt_adapter  # noqa: F401  (registers the HMT adapter type with PEFT)
    from hmt_adapter_cli.recipes import ModelArguments, load_model_and_tokenizer

    base, _ = load_model_and_tokenizer(ModelArguments(model_name_or_path=args.base))
    model = peft.PeftModel.from_pretrained(base, args.adapter)
    if not args.base.startswith("hmt-testing:"):
        model.peft_config["default"].base_model_name_or_path = args.base  # so AutoPeftModel finds the base model
    ids = torch.tensor([[5, 6, 7, 8] * 8])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    print(f"adapter loads and runs (loss on a probe: {loss.item():.3f})")
    model.save_pretrained(args.staging_dir)
    print(f"files that would be pushed to {args.repo_id} (written to {os.path.abspath(args.staging_dir)}): "
          f"{sorted(os.listdir(args.staging_dir))}")
    if not args.push:
        print("dry run: pass --push to upload")
        return
    url = model.push_to_hub(args.repo_id, private=args.private)
    print(f"pushed: {url}")


if __name__ == "__main__":
    main()
