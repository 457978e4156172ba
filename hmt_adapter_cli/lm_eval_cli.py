"""``hmt-adapter lm-eval ARGS...``: lm-evaluation-harness's own command line with the ``hmt`` model registered.

    hmt-adapter lm-eval --model hmt --model_args pretrained=BASE,peft=ADAPTER_DIR --batch_size 4 \\
        --tasks TASKS [--include_path DIR] [--output_path OUT] [--log_samples]

Every argument is lm-eval's (``hmt-adapter lm-eval --help`` prints lm-eval's help).
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str]) -> int:
    try:
        import hmt_adapter.lm_eval  # noqa: F401  (registers the "hmt" model)
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        raise ValueError(f'{exc} Install it with: pip install "hmt-adapter[eval]"') from None
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
