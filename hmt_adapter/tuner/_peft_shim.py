"""The one place that teaches PEFT about the "HMT" adapter type.

PEFT's `PeftType` is a closed `str` enum and `peft.utils.register_peft_method` refuses names that are not
members of it. This module adds an `HMT` member to the enum (through the enum's private tables: one of the
private APIs docs/design.md lists under "What stays private, and what protects it"), and `register()` then goes
through PEFT's public `register_peft_method`. `tests/test_peft_shim.py` fails loudly if a PEFT release changes
what this relies on.
"""

from __future__ import annotations

from peft.utils import PeftType

HMT_NAME = "HMT"
#: The prefix of every HMT parameter name (``hmt_memory_init``, ``hmt_lora_A``, ...), registered with PEFT as the
#: adapter type's prefix: PEFT saves, loads and marks trainable exactly the parameters whose names contain it.
#: Everything in the package that tests for the prefix reads it from here.
HMT_PREFIX = "hmt_"


def _add_enum_member() -> PeftType:
    """Add ``PeftType.HMT`` (idempotent) and return it."""
    existing = PeftType._value2member_map_.get(HMT_NAME)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, HMT_NAME)
    member._name_ = HMT_NAME
    member._value_ = HMT_NAME
    member.__objclass__ = PeftType
    PeftType._member_map_[HMT_NAME] = member
    PeftType._value2member_map_[HMT_NAME] = member
    PeftType._member_names_.append(HMT_NAME)
    type.__setattr__(PeftType, HMT_NAME, member)  # EnumType.__setattr__ forbids rebinding members
    return member


PEFT_TYPE_HMT = _add_enum_member()


def register(config_cls: type, model_cls: type) -> None:
    """Register the HMT config and tuner with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    if PEFT_TYPE_TO_TUNER_MAPPING.get(PEFT_TYPE_HMT) is model_cls:
        return
    register_peft_method(name=HMT_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=HMT_PREFIX)
