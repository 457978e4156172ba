"""`hmt_adapter.compile` (issue 10): the segment step compiles whole, once per kind of segment, and matches eager.

Graphs are counted with dynamo's `CompileCounterWithBackend` on the ``aot_eager`` backend (dynamo and AOT autograd
trace exactly as for inductor, without inductor's minutes of C++ compilation on the CPU). ``fullgraph=True`` makes
any graph break an error.
"""

from __future__ import annotations

import peft
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import hmt_adapter
from hmt_adapter import HMTConfig
from hmt_adapter import testing as hmt_testing
from hmt_adapter.engine.memory import observe_recall

SEG = 8


def _pair(checkpointing: bool = False, **overrides):
    """An eager HMT model and an identical one with its segment step compiled (and the counter of its graphs)."""
    models = []
    for _ in range(2):
        base = hmt_testing.tiny_causal_lm("llama")
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        config = HMTConfig(task_type="CAUSAL_LM", segment_length=SEG, num_sensory=2, recall_dim=16, **overrides)
        models.append(peft.get_peft_model(base, config))
    eager, compiled = models
    with torch.no_grad():  # non-trivial HMT parameters, the same in both
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
                q.copy_(p)
    counter = CompileCounterWithBackend("aot_eager")
    hmt_adapter.compile(compiled, backend=counter, fullgraph=True)
    return eager, compiled, counter


@pytest.fixture(scope="module")
def recall_pair():
    torch._dynamo.reset()
    counters.clear()
    return _pair()


def _batch(length: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, length) ids with row 1 left-padded by 5, so rows end their segments at different places."""
    ids = torch.randint(4, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask


def _train_call(model, ids, mask, **kwargs):
    model.train()
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def _assert_same_grads(eager_grads: dict, compiled_grads: dict) -> None:
    assert eager_grads.keys() == compiled_grads.keys() and eager_grads
    for name, g in eager_grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(compiled_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_segment_step_compiles_to_two_graphs_and_matches_eager_with_recall(recall_pair) -> None:
    eager, compiled, counter = recall_pair
    ids, mask = _batch(4 * SEG + 3)  # 4 full segments and a short last one (row 1: 3 full + 6 tokens)
    out_e, grads_e = _train_call(eager, ids, mask)
    out_c, grads_c = _train_call(compiled, ids, mask)
    # segment 0 (no sensory, reads m_0) and every later segment (the cache length is dynamic, the short last
    # segment padded): two graphs, no break
    assert counter.frame_count == 2
    assert not counters["graph_break"]
    torch.testing.assert_close(out_c.loss, out_e.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_c.logits, out_e.logits, rtol=1e-5, atol=1e-5)
    _assert_same_grads(grads_e, grads_c)
    # another length, another short last segment, a longer cache: nothing recompiles
    ids, mask = _batch(6 * SEG + 5, seed=1)
    out_e, grads_e = _train_call(eager, ids, mask)
    out_c, grads_c = _train_call(compiled, ids, mask)
    assert counter.frame_count == 2
    torch.testing.assert_close(out_c.loss, out_e.loss, rtol=1e-5, atol=1e-6)
    _assert_same_grads(grads_e, grads_c)


@pytest.mark.parametrize("scale", [dict(recall_scale="log_n"), dict(recall_sharpen_beyond=3)])
def test_log_n_recall_compiles_without_recompiling_for_longer_caches(scale) -> None:
    """recall_scale="log_n" and recall_sharpen_beyond read ln N off the scores tensor: still two graphs, none per
    cache length (the inputs run past the 3 memories where recall_sharpen_beyond=3 starts to scale)."""
    torch._dynamo.reset()
    counters.clear()
    eager, compiled, counter = _pair(**scale)
    for length, seed in ((4 * SEG + 3, 0), (7 * SEG + 5, 1)):
        ids, mask = _batch(length, seed=seed)
        out_e, grads_e = _train_call(eager, ids, mask)
        out_c, grads_c = _train_call(compiled, ids, mask)
        torch.testing.assert_close(out_c.loss, out_e.loss, rtol=1e-5, atol=1e-6)
        _assert_same_grads(grads_e, grads_c)
    assert counter.frame_count == 2
    assert not counters["graph_break"]


def test_fused_lm_head_path_matches_eager(recall_pair) -> None:
    eager, compiled, counter = recall_pair
    ids, mask = _batch(3 * SEG + 2)
    labels = ids.clone()
    labels[:, : SEG + 3] = -100  # a prompt that is not scored
    outs = []
    for model in (eager, compiled):
        model.train()
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (out_e, grads_e), (out_c, grads_c) = outs
    for field in ("loss", "log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(getattr(out_c, field), getattr(out_e, field), rtol=1e-5, atol=1e-5, msg=field)
    assert torch.equal(out_c.is_top1, out_e.is_top1) and torch.equal(out_c.label_mask, out_e.label_mask)
    _assert_same_grads(grads_e, grads_c)
    assert not counters["graph_break"]


def test_recall_observers_see_the_compiled_steps_weights(recall_pair) -> None:
    """Regression: the observers were read from a ContextVar inside `recall` (a graph break); the step now returns
    the weights and the forward hands them over, compiled or not."""
    eager, compiled, _ = recall_pair
    ids = torch.randint(4, 128, (1, 4 * SEG))
    seen = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        model.eval()
        weights = []
        with torch.no_grad(), observe_recall(weights.append):
            model(input_ids=ids)
        seen[name] = weights
    assert [w.shape for w in seen["compiled"]] == [(1, 1), (1, 2), (1, 3)]
    for w_c, w_e in zip(seen["compiled"], seen["eager"]):
        torch.testing.assert_close(w_c, w_e, rtol=1e-5, atol=1e-6)


def test_without_recall_and_with_gradient_checkpointing() -> None:
    torch._dynamo.reset()  # a fresh graph budget (dynamo's recompile limit is per function, across models)
    counters.clear()
    eager, compiled, counter = _pair(checkpointing=True, use_recall=False)
    ids, mask = _batch(5 * SEG + 1)
    out_e, grads_e = _train_call(eager, ids, mask)
    out_c, grads_c = _train_call(compiled, ids, mask)
    assert counter.frame_count == 2 and not counters["graph_break"]
    torch.testing.assert_close(out_c.loss, out_e.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_c.logits, out_e.logits, rtol=1e-5, atol=1e-5)
    _assert_same_grads(grads_e, grads_c)


def test_compile_switch() -> None:
    with pytest.raises(TypeError, match="HMT adapter"):
        hmt_adapter.compile(hmt_testing.tiny_causal_lm("llama"))
    model = peft.get_peft_model(hmt_testing.tiny_causal_lm("llama"), HMTConfig(task_type="CAUSAL_LM", segment_length=SEG))
    assert model.base_model.hmt_compiled_step is None  # off by default
    assert hmt_adapter.compile(model, backend="eager") is model
    assert callable(model.base_model.hmt_compiled_step)
    hmt_adapter.compile(model, enabled=False)
    assert model.base_model.hmt_compiled_step is None


def test_recall_observers_fire_once_per_segment_with_gradient_checkpointing() -> None:
    """Regression: the observers were called inside the checkpointed recall, so backward's recompute called them a
    second time for every segment. They are now called once, after the segment step."""
    base = hmt_testing.tiny_causal_lm("llama")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(base, HMTConfig(task_type="CAUSAL_LM", segment_length=SEG, num_sensory=2, recall_dim=16))
    model.train()
    ids = torch.randint(4, 128, (1, 4 * SEG))
    weights = []
    with observe_recall(weights.append):
        model(input_ids=ids, labels=ids).loss.backward()
    assert [tuple(w.shape) for w in weights] == [(1, 1), (1, 2), (1, 3)]
