"""Fails loudly if a PEFT release breaks what hmt_adapter.tuner._peft_shim relies on."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import peft
from packaging.version import Version
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import hmt_adapter
from hmt_adapter import HMTConfig, HMTModel
from hmt_adapter.tuner import _peft_shim


def test_enum_member_resolves() -> None:
    assert PeftType("HMT") is PeftType.HMT
    assert PeftType["HMT"] is PeftType.HMT
    assert "HMT" in list(PeftType) and PeftType.HMT == "HMT"
    assert PeftType.HMT.value == "HMT" and isinstance(PeftType.HMT, PeftType)


def test_mappings_registered() -> None:
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.HMT] is HMTConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.HMT] is HMTModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.HMT] == "hmt_"


def test_registration_is_idempotent() -> None:
    _peft_shim.register(HMTConfig, HMTModel)
    assert _peft_shim._add_enum_member() is PeftType.HMT
    assert [m for m in PeftType if m == "HMT"] == [PeftType.HMT]


def test_peft_version_within_pinned_range() -> None:
    pyproject = tomllib.loads((Path(hmt_adapter.__file__).parents[1] / "pyproject.toml").read_text())
    spec = next(d for d in pyproject["project"]["dependencies"] if re.match(r"peft\b", d))
    low, high = re.fullmatch(r"peft>=([\d.]+),<([\d.]+)", spec.replace(" ", "")).groups()
    assert Version(low) <= Version(peft.__version__) < Version(high), (
        f"PEFT {peft.__version__} is outside the tested range {spec}: re-run the suite and update the pin "
        f"and hmt_adapter/tuner/_peft_shim.py")
