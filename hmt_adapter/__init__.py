"""hmt-adapter: the Hierarchical Memory Transformer (arXiv 2405.06067) as a PEFT adapter.

Importing this package registers the "HMT" adapter type with PEFT, so `peft.get_peft_model(model,
HMTConfig(...))`, `PeftModel.from_pretrained` and `AutoPeftModelForCausalLM.from_pretrained` work. An installed
hmt-adapter also imports it whenever `peft` is imported (`_hmt_adapter_autoload`, off with HMT_ADAPTER_AUTOLOAD=0).
"""

from . import _peft_shim
from .config import HMTConfig
from .layer import HMTLayer
from .model import HMTFusedOutput, HMTModel

_peft_shim.register(HMTConfig, HMTModel)

from .compilation import compile  # noqa: E402,A001  (needs HMTModel; hmt_adapter.compile(model))

__version__ = "0.1.0"

__all__ = ["HMTConfig", "compile", "HMTFusedOutput", "HMTLayer", "HMTModel", "__version__"]
