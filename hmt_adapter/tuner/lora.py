"""LoRA owned by the HMT adapter (``HMTConfig(lora_r > 0)``): the HMT + LoRA option of the paper.

Why HMT owns its LoRA layers instead of injecting PEFT's `LoraModel` beside itself: PEFT keys every adapter
operation (add, set, delete, load with ``is_trainable=False``, save, status, unload) on ONE tuner and ONE config
per adapter name. A second tuner's LoRA would carry its own `LoraConfig` under the same name, which PEFT then
saves as ``peft_type: LORA``, freezes/deletes separately, and whose parameters lack HMT's ``hmt_`` prefix. As
`HMTLoraLinear` layers of the HMT tuner, the LoRA weights are simply more parameters of the HMT adapter.

The layer computes ``base(x) + B(A(dropout(x))) * lora_alpha / lora_r`` with A (r x in) initialised like
PEFT's default (Kaiming-uniform) and B (out x r) at zero, so a new adapter starts as the identity on the backbone.
It wraps ``nn.Linear``, transformers' ``Conv1D`` (GPT-2) and bitsandbytes' ``Linear4bit`` (any module whose
forward maps (..., in) -> (..., out)). Like every HMT layer it cannot be merged (`HMTTunerLayer.merge`).
"""

from __future__ import annotations

import math
from typing import Any, Union

import torch
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND
from torch import nn

from .config import HMTConfig
from .layer import HMTTunerLayer, _adapter_factory


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module (nn.Linear, bnb Linear4bit, transformers Conv1D)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    if hasattr(module, "nx") and hasattr(module, "nf"):  # transformers Conv1D: weight (in, out)
        return int(module.nx), int(module.nf)
    raise TypeError(
        f"HMT's LoRA can wrap linear layers only, got {type(module).__name__}. Narrow `lora_target_modules` to "
        f"linear projections (e.g. ['q_proj', 'v_proj'])."
    )


def lora_target_names(model: nn.Module, spec: Union[str, list[str], None]) -> list[str]:
    """Names of the backbone modules that get LoRA under ``lora_target_modules=spec``, in module order.

    PEFT's own rules, as its LoRA applies them: ``"all-linear"`` is PEFT's resolution (every ``nn.Linear``,
    bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` included, every transformers ``Conv1D``, and an adapter layer
    already wrapping one); a list of names or suffixes, or a regex, is matched by `check_target_module_exists`.
    Never the LM head or the input embeddings, nor a module inside an adapter layer. Raises `ValueError` when nothing
    matches, `TypeError` when a named module is not linear.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

    matching = LoraConfig(target_modules=spec)  # PEFT's matching rules read a config: one for the whole model
    all_linear = isinstance(spec, str) and spec.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND
    if all_linear:  # PEFT's resolver (private: docs/design.md, "What stays private") turns it into a set of names
        resolved = set(_maybe_include_all_linear_layers(matching, model).target_modules)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside_adapter: set[str] = set()
    names = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside_adapter):
            continue
        if isinstance(module, HMTTunerLayer):
            inside_adapter.add(name + ".")
        if module is head or module is model.get_input_embeddings():
            continue  # PEFT drops the head only for a PreTrainedModel; HMT never adapts either embedding
        if all_linear:
            if name in resolved:
                names.append(name)
        elif check_target_module_exists(matching, name):
            linear_features(module)  # TypeError naming the module type when it is not linear
            names.append(name)
    if not names:
        raise ValueError(
            f"HMTConfig.lora_target_modules={spec!r} matches no module of {type(model).__name__}. Use 'all-linear' or "
            f"names of its linear layers (e.g. ['q_proj', 'v_proj'])."
        )
    return names


class HMTLoraLinear(nn.Module, HMTTunerLayer):
    """A linear layer of the backbone with the HMT adapter's LoRA update.

    Parameters per adapter name (r = ``lora_r``):
        hmt_lora_A: in -> r, no bias.
        hmt_lora_B: r -> out, no bias, zero at init.

    Input shape: (..., in_features). Output shape: (..., out_features), in the base layer's output dtype.
    """

    adapter_layer_names = ("hmt_lora_A", "hmt_lora_B")
    other_param_names = ("hmt_lora_scaling", "hmt_lora_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: HMTConfig) -> None:
        super().__init__()
        HMTTunerLayer.__init__(self)
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer)
        self.hmt_lora_A = nn.ModuleDict()
        self.hmt_lora_B = nn.ModuleDict()
        self.hmt_lora_dropout = nn.ModuleDict()
        self.hmt_lora_scaling: dict[str, float] = {}
        self.merged_adapters = []  # per layer (BaseTunerLayer's class attribute is one shared list)
        self.set_adapter(adapter_name)  # public; enabled is BaseTunerLayer's default (enable_adapters toggles it)
        self.update_layer(adapter_name, config)

    @staticmethod
    def saved_param_names(config: HMTConfig) -> list[str]:
        """Names of the parameters `update_layer` creates, as a saved adapter's keys end (no adapter name)."""
        return ["hmt_lora_A.weight", "hmt_lora_B.weight"]

    def update_layer(self, adapter_name: str, config: HMTConfig) -> None:
        """Create adapter ``adapter_name``'s LoRA weights (on meta under PEFT's ``low_cpu_mem_usage=True``)."""
        r = config.lora_r
        weight = getattr(self.base_layer, "weight", None)
        factory = _adapter_factory(weight) if weight is not None else {"dtype": torch.float32}
        a = nn.Linear(self.in_features, r, bias=False, **factory)
        b = nn.Linear(r, self.out_features, bias=False, **factory)
        if a.weight.device.type != "meta":
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
        self.hmt_lora_A[adapter_name] = a
        self.hmt_lora_B[adapter_name] = b
        self.hmt_lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.hmt_lora_scaling[adapter_name] = config.lora_alpha / r
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.hmt_lora_A:
                continue
            a = self.hmt_lora_A[name]
            update = self.hmt_lora_B[name](a(self.hmt_lora_dropout[name](x.to(a.weight.dtype))))
            result = result + (update * self.hmt_lora_scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "hmt." + super().__repr__()
