"""Silence two third-party notices that every command would otherwise print, and nothing else.

- bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community ..." when it is imported on a CPU
  with AVX512-BF16, and PEFT imports bitsandbytes whenever it is installed, whether or not a 4-bit backbone is
  used. The CLI drops that one record (4-bit loading itself still reports its own errors).
- transformers 5 warns that ``is_gradient_checkpointing`` / ``gradient_checkpointing_enable`` and the training
  argument ``gradient_checkpointing`` are deprecated; the calls come from PEFT and TRL internals and TRL's
  ``SFTConfig`` defaults (hmt-adapter itself uses ``is_activation_checkpointing``).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
DEPRECATIONS = (r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated",)


class _DropNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(BNB_NOTICE)


def silence_third_party_notices() -> None:
    """Install the two narrow filters (idempotent). Call before importing peft."""
    logger = logging.getLogger(BNB_LOGGER)
    if not any(isinstance(f, _DropNotice) for f in logger.filters):
        logger.addFilter(_DropNotice())
    for pattern in DEPRECATIONS:
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Inside the block, datasets' and transformers' progress bars (dataset map passes, weight loading and
    saving) are off; they are restored after. For commands whose own lines already say what is happening."""
    import datasets
    import transformers

    datasets_on = datasets.is_progress_bar_enabled()
    transformers_on = transformers.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            transformers.utils.logging.enable_progress_bar()
