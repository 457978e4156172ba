"""Memory semantics: one batched summary pass, truncated BPTT on gradients, the recall variants, and
per-segment gradient checkpointing."""

from __future__ import annotations

import peft
import pytest
import torch

import hmt_adapter  # noqa: F401
from hmt_adapter import HMTConfig
from hmt_adapter.engine import observe_recall
from hmt_adapter import testing as T

L = 8  # segment_length


def _model(seed: int = 0, **overrides) -> peft.PeftModelForCausalLM:
    config = HMTConfig(**{"task_type": "CAUSAL_LM", "segment_length": L, "num_sensory": 2, "recall_dim": 16,
                          **overrides})
    base = T.tiny_causal_lm("llama")
    torch.manual_seed(seed)
    return peft.get_peft_model(base, config)


def _ids(length: int = 30, batch: int = 2) -> torch.Tensor:
    return torch.randint(4, T.TINY_VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(1))


def _count_calls(module: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    return calls, module.register_forward_hook(hook)


@pytest.mark.parametrize(("use_recall", "extra_calls"), [(True, 1), (False, 0)])
def test_summary_queries_in_one_batched_pass(use_recall: bool, extra_calls: int) -> None:
    model = _model(use_recall=use_recall)
    decoder = model.get_base_model().base_model  # the decoder stack HMT drives
    calls, handle = _count_calls(decoder)
    with torch.no_grad():
        model(input_ids=_ids(30))  # 4 segments
    handle.remove()
    assert calls[0] == 4 + extra_calls


def _segment_grad_norms(model, depth_labels_segment: int, num_segments: int = 4) -> list[float]:
    """Loss only on predictions made inside segment n; returns |grad| of the input embeddings per segment."""
    ids = _ids(num_segments * L, batch=2)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    labels = torch.full_like(ids, -100)
    n = depth_labels_segment
    labels[:, n * L + 1 : (n + 1) * L] = ids[:, n * L + 1 : (n + 1) * L]  # predicted at positions of segment n
    model(inputs_embeds=embeds, labels=labels).loss.backward()
    return [float(embeds.grad[:, s * L : (s + 1) * L].abs().sum()) for s in range(num_segments)]


@pytest.mark.parametrize("use_recall", [True, False])
@pytest.mark.parametrize("depth", [1, 2, 3, None])
def test_bptt_depth_truncates_gradients(depth, use_recall: bool) -> None:
    """Truncation is in blocks of K segments (memory and sensory are detached at each block start), so a loss
    at segment n reaches segments block_start(n)..n, never n-K. n = K + 1 is the deepest case: it reaches n-1."""
    model = _model(bptt_depth=depth, use_recall=use_recall)
    n = 3 if depth is None else depth + 1
    norms = _segment_grad_norms(model, n, num_segments=n + 1)
    reach = 0 if depth is None else (n // depth) * depth  # first segment of n's BPTT block
    assert norms[n] > 0
    for s in range(n):
        assert (norms[s] == 0.0) == (s < reach), (s, norms)
    if depth is not None:
        assert norms[n - depth] == 0.0
        if depth >= 2:
            assert norms[n - 1] > 0.0
    else:
        assert norms[0] > 0.0


@pytest.mark.parametrize("use_recall", [True, False])
def test_bptt_block_start_segment_gets_no_gradient_from_the_past(use_recall: bool) -> None:
    model = _model(bptt_depth=2, use_recall=use_recall)
    norms = _segment_grad_norms(model, 2, num_segments=3)  # segment 2 starts a block
    assert norms[2] > 0 and norms[0] == 0.0 and norms[1] == 0.0


def test_use_recall_false_has_no_recall_parameters() -> None:
    model = _model(use_recall=False)
    names = {n for n, _ in model.named_parameters() if "hmt_" in n}
    assert not any("recall" in n or "summary" in n for n in names)
    assert any("hmt_memory_init" in n for n in names)
    out = model(input_ids=_ids(30), labels=_ids(30))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "hmt_" in n)


@pytest.mark.parametrize("recall_query", ["previous", "segment"])
def test_recall_query_causality(recall_query: str) -> None:
    """'previous' is strictly causal: changing token p changes no logits before p. 'segment' looks ahead."""
    model = _model(recall_query=recall_query).eval()
    with torch.no_grad():  # a sharp recall (a fresh adapter's is nearly uniform), so the lookahead shows in the logits
        model.base_model.hmt_layer().hmt_recall_q["default"].weight.mul_(1e3)
    ids = _ids(30, batch=1)
    changed = ids.clone()
    p = 2 * L + 1  # inside the summary window of segment 2
    changed[0, p] = 4 if ids[0, p] != 4 else 5
    weights: list[torch.Tensor] = []
    with torch.no_grad(), observe_recall(weights.append):
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    assert not torch.equal(a[:, p:], b[:, p:])
    segment_2 = [w for w in weights if w.shape[-1] == 2]  # the recall of segment 2 reads 2 memories, once per call
    if recall_query == "previous":
        assert torch.equal(a[:, :p], b[:, :p])
        assert torch.equal(segment_2[0], segment_2[1])
    else:
        # the documented lookahead: segment 2's recall weights are chosen with its first tokens, token p included,
        # and the logits before p read the memory they select
        assert not torch.allclose(segment_2[0], segment_2[1])
        assert not torch.allclose(a[:, 2 * L : p], b[:, 2 * L : p])


def test_memory_projection_off() -> None:
    model = _model(memory_projection=False)
    assert not any("hmt_memory_proj" in n for n, _ in model.named_parameters())
    with_proj = _model(memory_projection=True)
    ids = _ids(30)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    with torch.no_grad():
        assert not torch.allclose(out.logits[:, L:], with_proj(input_ids=ids).logits[:, L:])
        torch.testing.assert_close(out.logits[:, :L], with_proj(input_ids=ids).logits[:, :L])  # segment 0: same m_0


def _hmt_grads(model) -> dict[str, torch.Tensor]:
    ids = _ids(30)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("order", ["before", "after"])
def test_gradient_checkpointing_same_gradients(order: str) -> None:
    reference = _hmt_grads(_model(seed=0))
    config = HMTConfig(task_type="CAUSAL_LM", segment_length=L, num_sensory=2, recall_dim=16)
    base = T.tiny_causal_lm("llama")
    if order == "before":
        base.gradient_checkpointing_enable()
    torch.manual_seed(0)
    model = peft.get_peft_model(base, config)
    if order == "after":
        model.gradient_checkpointing_enable()
    assert base.is_activation_checkpointing
    layer = base.model.layers[0]
    calls, handle = _count_calls(layer)
    grads = _hmt_grads(model)
    handle.remove()
    assert grads.keys() == reference.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-4, atol=1e-6)
    # 4 segment passes + 1 summary pass, each run once forward and recomputed once in backward: no double
    # recompute by transformers' own per-layer checkpointing inside HMT's per-segment one
    assert calls[0] == 2 * 5
    assert base.is_activation_checkpointing  # HMT restored the layers' flags


def test_without_checkpointing_layers_run_once() -> None:
    model = _model()
    calls, handle = _count_calls(model.get_base_model().model.layers[0])
    _hmt_grads(model)
    handle.remove()
    assert calls[0] == 5
