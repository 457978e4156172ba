"""hmt-adapter: the Hierarchical Memory Transformer (arXiv 2405.06067) as a PEFT adapter.

Importing this package registers the "HMT" adapter type with PEFT, so `peft.get_peft_model(model,
HMTConfig(...))`, `PeftModel.from_pretrained` and `AutoPeftModelForCausalLM.from_pretrained` work. An installed
hmt-adapter also imports it whenever `peft` is imported (`_hmt_adapter_autoload`, off with HMT_ADAPTER_AUTOLOAD=0).

Layers, each importing only the ones below it (docs/design.md, section 3):

- `hmt_adapter.engine`: the computation (token layout, memory, segment step, whole-batch forward, stream state).
- `hmt_adapter.inference`: generation, beam search and streaming over the engine's stream state.
- `hmt_adapter.tuner`: the PEFT tuner (config, layers, LoRA, model, weight checks, model card, registration).
- `hmt_adapter.integrations`: what users opt into (TRL helpers, lm-eval, FSDP); `hmt_adapter.evaluation` and
  `hmt_adapter.testing` use the public API only.
"""

from .tuner import HMTConfig, HMTFusedOutput, HMTLayer, HMTModel, compile  # noqa: A004  (hmt_adapter.compile)

__version__ = "0.1.0"

__all__ = ["HMTConfig", "compile", "HMTFusedOutput", "HMTLayer", "HMTModel", "__version__"]
