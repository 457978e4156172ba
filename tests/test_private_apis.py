"""Fails loudly when a release changes a private API hmt-adapter relies on.

Each test pins one entry of docs/design.md, "What stays private, and what protects it": that the private thing
exists with the shape the package uses. PeftType's enum internals are pinned in tests/test_peft_shim.py (with the
PEFT version bound); the behaviour built on each entry is tested where it is used (generation, ragged decoding,
compile, lm-eval). A failure here names what moved, before a behavioural test fails in a less obvious way.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import re
import tomllib
from pathlib import Path

import peft
import pytest
import torch
import transformers
from packaging.version import Version

import hmt_adapter
from hmt_adapter import HMTConfig
from hmt_adapter import testing as T
from hmt_adapter.tuner.lora import HMTLoraLinear


def _bounds(package: str) -> tuple[Version, Version]:
    pyproject = tomllib.loads((Path(hmt_adapter.__file__).parents[1] / "pyproject.toml").read_text())
    spec = next(d for d in pyproject["project"]["dependencies"] if re.match(rf"{package}\b", d))
    low, high = re.fullmatch(rf"{package}>=([\d.]+),<([\d.]+)", spec.replace(" ", "")).groups()
    return Version(low), Version(high)


@pytest.mark.parametrize("module", [transformers, torch], ids=["transformers", "torch"])
def test_installed_version_within_pinned_range(module) -> None:
    low, high = _bounds(module.__name__)
    installed = Version(Version(module.__version__).base_version)  # torch's '2.13.0+cpu'
    assert low <= installed < high, (
        f"{module.__name__} {module.__version__} is outside the tested range [{low}, {high}) in pyproject.toml: re-run "
        f"the suite (this file first) and update the bound and docs/design.md, 'What stays private'.")


def _hmt(model_type: str = "llama", lora: bool = False):
    config = HMTConfig(task_type="CAUSAL_LM", segment_length=8, num_sensory=2, recall_dim=16, lora_r=2 if lora else 0)
    return peft.get_peft_model(T.tiny_causal_lm(model_type), config)


# ---- PEFT -----------------------------------------------------------------------------------------------------
def test_peft_input_embeddings_name() -> None:
    """tuner/model.py: peft.utils._get_input_embeddings_name(model, default)."""
    from peft.utils import _get_input_embeddings_name

    assert _get_input_embeddings_name(T.tiny_causal_lm("llama"), None) == "model.embed_tokens"
    assert _get_input_embeddings_name(T.tiny_causal_lm("gpt2"), None) == "transformer.wte"
    assert _get_input_embeddings_name(torch.nn.Linear(2, 2), None) is None


def test_peft_all_linear_resolution() -> None:
    """tuner/lora.py: _maybe_include_all_linear_layers(config, model) sets config.target_modules to module names:
    Linear and Conv1D layers and adapter layers wrapping one, never the LM head nor what is inside an adapter layer."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    gpt2 = T.tiny_causal_lm("gpt2")
    names = set(_maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear"), gpt2).target_modules)
    assert "transformer.h.0.attn.c_attn" in names and "lm_head" not in names  # Conv1D in, the head out

    inner = _hmt("llama", lora=True).base_model.model
    names = set(_maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear"), inner).target_modules)
    wrapped = {n for n, m in inner.named_modules() if isinstance(m, HMTLoraLinear)}
    assert wrapped and wrapped <= names
    assert not any(".base_layer" in n or ".hmt_" in n for n in names) and "lm_head" not in names


def test_peft_tuner_hooks_hmtmodel_overrides() -> None:
    """tuner/model.py overrides BaseTuner's underscored hooks: a rename would leave the override uncalled."""
    from peft.tuners.tuners_utils import BaseTuner

    for hook in ("_check_new_adapter_config", "_prepare_adapter_config", "_create_and_replace", "_check_tied_modules",
                 "_get_tied_target_modules", "_replace_module"):
        assert callable(getattr(BaseTuner, hook, None)), f"peft.tuners.tuners_utils.BaseTuner.{hook} is gone"
    params = list(inspect.signature(BaseTuner._create_and_replace).parameters)
    assert params[:7] == ["self", "peft_config", "adapter_name", "target", "target_name", "parent", "current_key"]
    assert list(inspect.signature(BaseTuner._prepare_adapter_config).parameters)[1:3] == ["peft_config", "model_config"]


def test_peft_layer_status_reads_the_type_from_repr() -> None:
    """tuner/layer.py, lora.py: get_layer_status's module_type is repr(layer) up to '(' (PEFT's layers: 'lora.')."""
    model = _hmt("llama", lora=True)
    rows = {row.name: row.module_type for row in model.get_layer_status()}
    modules = dict(model.base_model.named_modules())
    assert rows and all(kind == repr(modules[name]).partition("(")[0] for name, kind in rows.items())
    assert set(rows.values()) == {"hmt.HMTLayer", "hmt.HMTLoraLinear"}


# ---- transformers ---------------------------------------------------------------------------------------------
def test_generation_special_tokens_and_logits_processor() -> None:
    """inference/generation.py: GenerationMixin._prepare_special_tokens and _get_logits_processor, and the
    _eos_token_tensor (1-D) / _pad_token_tensor (0-d) they leave on the GenerationConfig."""
    from transformers import GenerationConfig, LogitsProcessorList

    model = T.tiny_causal_lm("llama")
    cfg = GenerationConfig(eos_token_id=[2, 3], pad_token_id=0, temperature=0.7, do_sample=True)
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    model._prepare_special_tokens(cfg, True, device=ids.device, batch_size=2)
    assert cfg._eos_token_tensor.tolist() == [2, 3] and cfg._pad_token_tensor.dim() == 0 and int(cfg._pad_token_tensor) == 0
    processors = model._get_logits_processor(
        generation_config=cfg, input_ids_seq_length=3, encoder_input_ids=ids, logits_processor=LogitsProcessorList(),
        device=ids.device, model_kwargs={"attention_mask": torch.ones_like(ids)},
    )
    assert isinstance(processors, LogitsProcessorList) and len(processors) > 0


def test_dynamic_cache_layers() -> None:
    """engine/ragged.py, engine/stream.py: DynamicCache.layers, a layer's .keys/.values (B, h, S, hd) replaced in
    place and extended by the next call, a sliding layer's is_sliding / sliding_window / cumulative_length, and
    Cache.reorder_cache(index)."""
    from transformers import DynamicCache

    model = T.tiny_causal_lm("mistral", sliding_window=12).eval()
    ids = torch.randint(4, T.TINY_VOCAB_SIZE, (2, 5))
    with torch.no_grad():
        kv = model(input_ids=ids, use_cache=True).past_key_values
    assert isinstance(kv, DynamicCache) and len(kv.layers) == model.config.num_hidden_layers
    layer = kv.layers[0]
    assert layer.keys.dim() == 4 and layer.keys.shape[0] == 2 and layer.keys.shape[2] == 5
    assert layer.is_sliding and layer.sliding_window == 12 and layer.cumulative_length == 5

    other = copy.copy(kv)  # ragged.py: a shallow copy with its own layer objects leaves the original alone
    other.layers = [copy.copy(layer) for layer in kv.layers]
    for mine in other.layers:
        mine.keys, mine.values = mine.keys[:, :, :3], mine.values[:, :, :3]
        mine.cumulative_length = 3
    assert kv.layers[0].keys.shape[2] == 5 and other.get_seq_length() == 3
    with torch.no_grad():
        model(input_ids=ids[:, :1], past_key_values=other, use_cache=True, position_ids=torch.full((2, 1), 3))
    assert other.layers[0].keys.shape[2] == 4 and other.layers[0].cumulative_length == 4  # appended to ours

    first = kv.layers[0].keys.clone()
    kv.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(kv.layers[0].keys, first.flip(0))


def test_attn_implementation_and_no_split_modules() -> None:
    """engine/ragged.py reads config._attn_implementation; integrations/fsdp.py PreTrainedModel._no_split_modules."""
    model = T.tiny_causal_lm("llama", attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    assert "LlamaDecoderLayer" in set(model._no_split_modules)


# ---- torch ----------------------------------------------------------------------------------------------------
def test_dynamo_mark_unbacked() -> None:
    """engine/forward.py: torch._dynamo.decorators.mark_unbacked(tensor, dim) before calling the compiled step."""
    from torch._dynamo.decorators import mark_unbacked

    params = inspect.signature(mark_unbacked).parameters
    assert list(params)[:2] == ["t", "index"], list(params)
    mark_unbacked(torch.zeros(2, 3, 4), 1)


# ---- lm-eval (optional) ---------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_lm_eval_private_entry_points() -> None:
    """integrations/lm_eval.py overrides HFLM._loglikelihood_tokens; hmt_adapter_cli/lm_eval_cli.py parses with
    lm_eval._cli.HarnessCLI (falling back to lm_eval.__main__.cli_evaluate without it)."""
    from lm_eval.models.huggingface import HFLM

    params = list(inspect.signature(HFLM._loglikelihood_tokens).parameters)
    assert params[:4] == ["self", "requests", "disable_tqdm", "override_bs"], params
    from lm_eval._cli import HarnessCLI

    assert callable(getattr(HarnessCLI, "parse_args", None)) and callable(getattr(HarnessCLI, "execute", None))
