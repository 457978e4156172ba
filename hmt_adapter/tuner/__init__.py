"""The HMT tuner for PEFT: `HMTConfig` (config.py), the layers that hold its parameters (layer.py, lora.py), the
tuner `HMTModel` (model.py), the checks and card of a saved adapter (weights.py, model_card.py) and
`hmt_adapter.compile` (compilation.py). Importing this package registers the "HMT" adapter type with PEFT, here and
nowhere else (the enum member PEFT needs first is added by `_peft_shim`)."""

from . import _peft_shim
from .config import HMTConfig
from .layer import HMTLayer
from .model import HMTFusedOutput, HMTModel

_peft_shim.register(HMTConfig, HMTModel)

from .compilation import compile  # noqa: E402,A004  (needs HMTModel; hmt_adapter.compile(model))

__all__ = ["HMTConfig", "HMTFusedOutput", "HMTLayer", "HMTModel", "compile"]
