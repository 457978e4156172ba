"""The PEFT tuner layers that hold an HMT adapter's trainable parameters.

HMT does not change any backbone layer: it feeds the backbone extra input embeddings. Its parameters
still live in a `BaseTunerLayer` (`HMTLayer`, wrapping the backbone's input-embedding module, whose forward it
leaves unchanged) so PEFT's own machinery finds them: saving only the adapter, `disable_adapter()`,
`get_model_status()`, `unload()`, `print_trainable_parameters()`.

With ``lora_r > 0`` the same adapter also owns LoRA layers on the backbone (`HMTLoraLinear`). They are HMT's own
layers rather than PEFT's `LoraModel` injected beside it, so that an HMT + LoRA adapter is ONE adapter for every
PEFT operation: one config (``peft_type: HMT``), one state dict, one name; add / set / delete / load /
``is_trainable=False`` / ``disable_adapter`` / ``unload`` reach both parts through PEFT's own loops over the tuner
layers, and every trainable parameter carries the tuner's ``hmt_`` prefix.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..engine import HMTParams
from ._peft_shim import HMT_PREFIX
from .config import HMTConfig


def write_token_init_id(config: HMTConfig, vocab_size: int) -> int:
    """The token whose input embedding starts the learned write token: the last token of
    ``config.write_token_init_text`` under ``config.tokenizer_name_or_path``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
    ids = tokenizer(config.write_token_init_text, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"HMTConfig.write_token_init_text {config.write_token_init_text!r} has no tokens under the "
                         f"tokenizer {config.tokenizer_name_or_path!r}.")
    if ids[-1] == tokenizer.unk_token_id:
        raise ValueError(f"The last token of write_token_init_text {config.write_token_init_text!r} is the unknown "
                         f"token of {config.tokenizer_name_or_path!r}: choose text the tokenizer knows.")
    if ids[-1] >= vocab_size:
        raise ValueError(f"The tokenizer {config.tokenizer_name_or_path!r} gives token id {ids[-1]} for "
                         f"write_token_init_text, beyond the backbone's {vocab_size} input embeddings: is it the "
                         "backbone's tokenizer?")
    return ids[-1]


class HMTTunerLayer(BaseTunerLayer):
    """Base of every layer an HMT adapter injects (`HMTModel.tuner_layer_cls`). None of them can be merged into
    the backbone: HMT's memory is computed at run time and has no merged form."""

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError(
            "HMT cannot be merged into the backbone's weights (LoRA part included): its memory is computed at run "
            "time. Keep the adapter attached, or call `unload()` to get the plain backbone back."
        )

    def unmerge(self) -> None:
        return None


def _adapter_factory(base_weight: torch.Tensor) -> dict:
    """Device and dtype of new adapter parameters: the base weight's, float32 for quantized/integer weights.

    PEFT's ``autocast_adapter_dtype=True`` (its default) then upcasts bf16/fp16 adapter weights to float32;
    with ``autocast_adapter_dtype=False`` they stay in the backbone's dtype.
    """
    dtype = base_weight.dtype if base_weight.is_floating_point() else torch.float32
    return {"device": base_weight.device, "dtype": dtype}


class HMTLayer(nn.Module, HMTTunerLayer):
    """Wraps the backbone's input embeddings and holds, per adapter name, HMT's parameters.

    Parameters (d = input-embedding width, h = ``recall_dim``):
        hmt_memory_init:   (d,)   learned initial memory m_0, read by segment 0.
        hmt_summary_token: (d,)   learned token s framing the summary pass (only with ``use_recall``).
        hmt_write_token:   (d,)   learned write token w at the write position (only with ``write_token="learned"``).
        hmt_recall_q:      d -> h query projection W_q, no bias (only with ``use_recall``).
        hmt_recall_k:      d -> h key projection W_k, no bias (only with ``use_recall``).
        hmt_memory_proj:   d -> d projection of memory embeddings, initialised to the identity
                           (only with ``memory_projection``).
        hmt_memory_gate:   ()     gate g on the recalled memory, zero at init (only with ``memory_gate``).
        hmt_recall_null:   (d,)   the null slot's key source n: recall also scores W_k n, valued m_0 (only with
                           ``recall_null``).

    ``forward`` is the wrapped embedding's forward, unchanged.
    """

    adapter_layer_names = (
        "hmt_memory_init",
        "hmt_summary_token",
        "hmt_write_token",
        "hmt_recall_q",
        "hmt_recall_k",
        "hmt_memory_proj",
        "hmt_memory_gate",
        "hmt_recall_null",
    )
    other_param_names = ()

    def __init__(self, base_layer: nn.Embedding, adapter_name: str, config: HMTConfig) -> None:
        super().__init__()
        BaseTunerLayer.__init__(self)
        self.base_layer = base_layer
        self.hmt_memory_init = nn.ParameterDict()
        self.hmt_summary_token = nn.ParameterDict()
        self.hmt_write_token = nn.ParameterDict()
        self.hmt_recall_q = nn.ModuleDict()
        self.hmt_recall_k = nn.ModuleDict()
        self.hmt_memory_proj = nn.ModuleDict()
        self.hmt_memory_gate = nn.ParameterDict()
        self.hmt_recall_null = nn.ParameterDict()
        self.merged_adapters = []  # per layer (BaseTunerLayer's class attribute is one shared list)
        self.set_adapter(adapter_name)  # public; enabled is BaseTunerLayer's default (enable_adapters toggles it)
        self.update_layer(adapter_name, config)

    # The wrapped module stays usable as an embedding by code that inspects it.
    @property
    def embedding_dim(self) -> int:
        return self.base_layer.weight.shape[1]

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.weight.shape[0]

    @property
    def padding_idx(self):
        return getattr(self.base_layer, "padding_idx", None)

    def forward(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base_layer(input_ids, *args, **kwargs)

    @torch.no_grad()
    def embedding_row_norm(self) -> torch.Tensor:
        """Mean L2 norm of the embedding rows, as a 0-d float32 tensor: the scale memory is mapped back to."""
        weight = self.base_layer.weight
        if weight.device.type == "meta":
            return torch.ones((), device="meta")
        return weight.float().norm(dim=-1).mean()

    def params(self, adapter_name: str, config: HMTConfig) -> HMTParams:
        """The tensors of adapter ``adapter_name`` the engine runs with (None for the parts ``config`` turns off)."""

        def get(container, is_linear: bool):
            if adapter_name not in container:
                return None
            return container[adapter_name].weight if is_linear else container[adapter_name]

        return HMTParams(
            memory_init=self.hmt_memory_init[adapter_name],
            summary_token=get(self.hmt_summary_token, False),
            write_token=get(self.hmt_write_token, False) if config.write_token == "learned" else None,
            w_q=get(self.hmt_recall_q, True),
            w_k=get(self.hmt_recall_k, True),
            memory_proj=get(self.hmt_memory_proj, True) if config.memory_projection else None,
            memory_gate=get(self.hmt_memory_gate, False) if config.memory_gate else None,
            embed_norm=self.embedding_row_norm(),
            recall_null=get(self.hmt_recall_null, False) if config.recall_null else None,
            recall_log_n=config.recall_scale == "log_n",
            recall_sharpen_beyond=config.recall_sharpen_beyond,
        )

    @staticmethod
    def saved_param_names(config: HMTConfig) -> list[str]:
        """Names of the parameters `update_layer` creates for ``config``, as a saved adapter's keys end (no adapter
        name): ``hmt_memory_init``, ``hmt_recall_q.weight``, ... Read off a layer built on the meta device, so this
        cannot drift from `update_layer`."""
        probe = HMTLayer(nn.Embedding(1, 1, device="meta"), "probe", config)
        return [name.replace(".probe", "", 1) for name, _ in probe.named_parameters() if name.startswith(HMT_PREFIX)]

    def update_layer(self, adapter_name: str, config: HMTConfig) -> None:
        """Create the parameters of adapter ``adapter_name`` on the embedding's device and dtype (see
        `_adapter_factory`). Under PEFT's ``low_cpu_mem_usage=True`` they are created on the meta device and
        materialised when the adapter's weights are loaded."""
        weight = self.base_layer.weight
        d = weight.shape[1]
        factory = _adapter_factory(weight)
        meta = weight.device.type == "meta"
        with torch.no_grad():
            if meta:
                mean = torch.zeros(d, **factory)
            else:
                mean = weight.float().mean(dim=0).to(factory["dtype"])
            # m_0 and s start at the mean embedding, a point the frozen backbone has seen, plus small noise.
            self.hmt_memory_init[adapter_name] = nn.Parameter(mean + config.init_std * torch.randn(d, **factory))
            if config.write_token == "learned":
                start = mean + config.init_std * torch.randn(d, **factory)
                if config.write_token_init_text is not None and not config.inference_mode and not meta:
                    start = weight[write_token_init_id(config, weight.shape[0])].to(factory["dtype"]).clone()
                self.hmt_write_token[adapter_name] = nn.Parameter(start)
            if config.use_recall:
                self.hmt_summary_token[adapter_name] = nn.Parameter(mean + config.init_std * torch.randn(d, **factory))
                self.hmt_recall_q[adapter_name] = nn.Linear(d, config.recall_dim, bias=False, **factory)
                self.hmt_recall_k[adapter_name] = nn.Linear(d, config.recall_dim, bias=False, **factory)
                nn.init.normal_(self.hmt_recall_q[adapter_name].weight, std=config.init_std)
                nn.init.normal_(self.hmt_recall_k[adapter_name].weight, std=config.init_std)
                if config.memory_gate:  # zero: segment n >= 1 starts by reading m_0, as segment 0 does
                    self.hmt_memory_gate[adapter_name] = nn.Parameter(torch.zeros((), **factory))
                if config.recall_null:  # a point like m_0: its key starts as far from the query as a memory's
                    self.hmt_recall_null[adapter_name] = nn.Parameter(mean + config.init_std * torch.randn(d, **factory))
            if config.memory_projection:
                proj = nn.Linear(d, d, bias=False, **factory)
                if proj.weight.device.type != "meta":
                    proj.weight.copy_(torch.eye(d, **factory))
                self.hmt_memory_proj[adapter_name] = proj
        self.set_adapter(self.active_adapters)

    def __repr__(self) -> str:
        return "hmt." + super().__repr__()  # PEFT's get_layer_status reads the module type from here
