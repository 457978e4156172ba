"""``hmt-adapter lm-eval ARGS...``: lm-evaluation-harness's own command line with the ``hmt`` model registered.

    hmt-adapter lm-eval --model hmt --model_args pretrained=BASE,peft=ADAPTER_DIR --batch_size 4 \\
        --tasks TASKS [--include_path DIR] [--output_path OUT] [--log_samples]

Every argument is lm-eval's; ``hmt-adapter lm-eval --help`` prints what the ``hmt`` model takes, then lm-eval's
help. lm-eval's parser answers help and argument errors before torch and transformers are imported; the ``hmt``
model (`hmt_adapter.integrations.lm_eval`) is registered only when an evaluation starts.
"""

from __future__ import annotations

import sys
from typing import Sequence

HMT_HELP = """\
hmt-adapter lm-eval: lm-evaluation-harness's command line, with the HMT model 'hmt' registered.

  hmt-adapter lm-eval --model hmt --model_args pretrained=BASE,peft=ADAPTER_DIR[,dtype=bfloat16] \\
      --batch_size 4 --tasks TASKS [--include_path DIR] [--output_path OUT --log_samples]

model_args of 'hmt' (those of lm-eval's 'hf' model, comma-separated):
  pretrained=BASE      the backbone: Hub id or local directory (required)
  peft=ADAPTER_DIR     the HMT adapter: a directory written by save_pretrained / hmt-adapter train, or a Hub id (required)
  dtype=, tokenizer=, revision=, trust_remote_code=, device=   as for 'hf'
The HMT settings (recall_query, segment_length, ...) are the adapter's own (its adapter_config.json). Contexts of any
length are read whole, never truncated, so max_length= and --batch_size auto are refused. With the adapter's
recall_query='segment' (the paper's) log-likelihood requests are scored one at a time; 'previous' batches them.
See docs/lm-eval.md. lm-eval's own help follows.
"""


def _missing_lm_eval(exc: ImportError) -> ValueError:
    return ValueError(f'{exc} Install it with: pip install "hmt-adapter[eval]"')


def _register_hmt() -> None:
    try:
        import hmt_adapter.integrations.lm_eval  # noqa: F401  (registers the "hmt" model)
    except ImportError as exc:
        raise _missing_lm_eval(exc) from None


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(HMT_HELP, flush=True)
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        try:
            from lm_eval._cli import HarnessCLI
            from lm_eval.utils import setup_logging
        except ImportError:  # an lm-eval without its light parser module: import everything first
            _register_hmt()
            try:
                from lm_eval.__main__ import cli_evaluate
            except ImportError as exc:
                raise _missing_lm_eval(exc) from None
            cli_evaluate()
            return 0
        setup_logging()
        parser = HarnessCLI()
        args = parser.parse_args()  # help and argument errors are answered here, before torch is imported
        _register_hmt()
        parser.execute(args)
    finally:
        sys.argv = saved
    return 0
