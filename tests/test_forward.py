"""The HMT forward: HF loss and logits semantics, logits_to_keep, TRL's fused protocol, padding, dtypes."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F

import hmt_adapter  # noqa: F401
from hmt_adapter import HMTConfig, HMTFusedOutput
from hmt_adapter import testing as T

V = T.TINY_VOCAB_SIZE


def _model(model_type: str = "llama", **overrides) -> peft.PeftModelForCausalLM:
    config = HMTConfig(**{"task_type": "CAUSAL_LM", "segment_length": 8, "num_sensory": 2, "recall_dim": 16,
                          **overrides})
    return peft.get_peft_model(T.tiny_causal_lm(model_type), config)


def _ids(batch: int = 2, length: int = 30, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[:, :5] = -100  # an unlabelled prompt
    labels[0, 17] = -100
    return labels


def _hf_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face's causal-LM loss: shift once over the whole row, mean over labelled tokens."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def test_loss_is_hf_causal_loss_over_all_segments() -> None:
    model = _model()
    ids = _ids()
    labels = _labels(ids)
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, 30, V)
    torch.testing.assert_close(out.loss, _hf_loss(out.logits, labels))
    # the first token of a segment is predicted by the last token of the previous one and is scored
    only_border = torch.full_like(ids, -100)
    only_border[:, 8] = ids[:, 8]
    out_border = model(input_ids=ids, labels=only_border)
    torch.testing.assert_close(out_border.loss, F.cross_entropy(out.logits[:, 7], ids[:, 8]))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "hmt_" in n)


def test_loss_without_logits_matches() -> None:
    """Without logits requested (logits_to_keep selecting the last token) the chunked loss path gives the same loss."""
    model = _model()
    ids = _ids()
    labels = _labels(ids)
    full = model(input_ids=ids, labels=labels)
    last = model(input_ids=ids, labels=labels, logits_to_keep=1)
    assert last.logits.shape == (2, 1, V)
    torch.testing.assert_close(last.loss, full.loss)
    torch.testing.assert_close(last.logits, full.logits[:, -1:])


def test_logits_to_keep_int_and_tensor() -> None:
    model = _model().eval()
    ids = _ids()
    with torch.no_grad():
        full = model(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids, logits_to_keep=3).logits, full[:, -3:])
        torch.testing.assert_close(model(input_ids=ids, logits_to_keep=0).logits, full)
        positions = torch.tensor([0, 7, 8, 29])
        torch.testing.assert_close(model(input_ids=ids, logits_to_keep=positions).logits, full[:, positions])


def test_fused_lm_head_matches_logits() -> None:
    model = _model()
    ids = _ids()
    labels = _labels(ids)
    out = model(input_ids=ids, labels=labels)
    fused = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert isinstance(fused, HMTFusedOutput) and not hasattr(fused, "logits")
    logp_all = out.logits[:, :-1].float().log_softmax(-1)
    target = labels[:, 1:]
    mask = target != -100
    expected_lp = logp_all.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    assert fused.log_probs.shape == (2, 29)
    assert torch.equal(fused.label_mask, mask)
    torch.testing.assert_close(fused.log_probs, expected_lp)
    torch.testing.assert_close(fused.entropy, -(logp_all.exp() * logp_all).sum(-1) * mask)
    assert torch.equal(fused.is_top1, (out.logits[:, :-1].argmax(-1) == target) & mask)
    torch.testing.assert_close(fused.loss, out.loss)
    # gradients agree too
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad])
    fused_grads = torch.autograd.grad(fused.loss, [p for p in model.parameters() if p.requires_grad])
    for a, b in zip(grads, fused_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_lm_head_num_items_in_batch() -> None:
    model = _model()
    ids = _ids()
    labels = _labels(ids)
    fused = model(input_ids=ids, labels=labels, fused_lm_head=True, num_items_in_batch=100)
    torch.testing.assert_close(fused.loss, -fused.log_probs.sum() / 100)


def test_loss_scope_last_segment_scores_the_last_segment_length_labels() -> None:
    """The reference's protocol: the last segment_length (8) labels of the row, the first of them predicted from the
    position before them (across the segment border), by hand from the logits of the plain forward."""
    model = _model()
    ids = _ids()  # 30 tokens, segments of 8
    out_all = model(input_ids=ids, labels=ids)
    model.peft_config["default"].loss_scope = "last_segment"
    out_last = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_last.logits, out_all.logits)
    # labels are tokens 22..29, predicted at positions 21..28
    expected = F.cross_entropy(out_all.logits[:, 21:29].reshape(-1, V), ids[:, 22:30].reshape(-1))
    torch.testing.assert_close(out_last.loss, expected)
    fused = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert fused.label_mask.sum(dim=1).tolist() == [8] * ids.shape[0]


def test_loss_scope_last_segment_per_row_with_padding_and_short_rows() -> None:
    model = _model().eval()
    model.peft_config["default"].loss_scope = "last_segment"
    rows = [_ids(1, n, seed=20 + n)[0] for n in (30, 13, 5)]
    expected_num, expected_den = 0.0, 0
    for row in rows:
        with torch.no_grad():
            logits = model(input_ids=row[None]).logits[0]
        first = max(0, len(row) - 8 - 1)  # rows shorter than 8 + 1 score every label
        expected_num += F.cross_entropy(logits[first:-1], row[first + 1 :], reduction="sum").item()
        expected_den += len(row) - 1 - first
    width = 30
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    assert expected_den == 8 + 8 + 4
    torch.testing.assert_close(out.loss.item(), expected_num / expected_den, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(side: str) -> None:
    model = _model().eval()
    lengths = [30, 19, 5]
    rows = [_ids(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, labels=labels)
        nll_sum, count = 0.0, 0
        for i, row in enumerate(rows):
            alone = model(input_ids=row[None], labels=row[None])
            real = mask[i].bool()
            torch.testing.assert_close(batched.logits[i, real], alone.logits[0], rtol=1e-4, atol=1e-5)
            nll_sum += alone.loss * (len(row) - 1)
            count += len(row) - 1
        torch.testing.assert_close(batched.loss, nll_sum / count, rtol=1e-5, atol=1e-6)
        fused = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        for i, row in enumerate(rows):
            alone = model(input_ids=row[None], labels=row[None], fused_lm_head=True)
            torch.testing.assert_close(fused.log_probs[i][fused.label_mask[i]], alone.log_probs[0], rtol=1e-4, atol=1e-5)


def test_bf16_autocast_with_float32_adapter() -> None:
    model = _model()
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "hmt_" in n)
    ids = _ids()
    reference = model(input_ids=ids, labels=ids).loss.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
        fused = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert torch.isfinite(out.loss) and torch.isfinite(fused.loss)
    assert abs(out.loss.item() - reference.item()) < 0.1
    (out.loss + fused.loss).backward()
    grads = [p.grad for n, p in model.named_parameters() if "hmt_" in n]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0
               for g in grads)


def test_bf16_backbone() -> None:
    base = T.tiny_causal_lm("llama").to(torch.bfloat16)
    config = HMTConfig(task_type="CAUSAL_LM", segment_length=8, num_sensory=2, recall_dim=16)
    model = peft.get_peft_model(base, config)
    ids = _ids()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 30, V) and torch.isfinite(out.loss)
    fused = model(input_ids=ids, labels=ids, fused_lm_head=True)
    torch.testing.assert_close(fused.loss.float(), out.loss.float(), rtol=2e-2, atol=2e-2)
    out.loss.backward()
    hmt = [p for n, p in model.named_parameters() if "hmt_" in n]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in hmt)


@pytest.mark.parametrize("path", ["logits", "logits_to_keep", "fused_lm_head"])
def test_all_labels_ignored_gives_nan_like_transformers(path: str) -> None:
    """With every label -100 there is nothing to average: transformers' loss is nan, so is HMT's on every path."""
    base = T.tiny_causal_lm("llama")
    ids = _ids()
    ignored = torch.full_like(ids, -100)
    assert torch.isnan(base(input_ids=ids, labels=ignored).loss)  # the behaviour followed
    kwargs = {"logits": {}, "logits_to_keep": {"logits_to_keep": 1}, "fused_lm_head": {"fused_lm_head": True}}[path]
    model = _model()
    assert torch.isnan(model(input_ids=ids, labels=ignored, **kwargs).loss)
    assert torch.isnan(model(input_ids=ids, shift_labels=ignored, **kwargs).loss)
    # a batch whose count is given keeps transformers' sum / num_items_in_batch
    given = base(input_ids=ids, labels=ignored, num_items_in_batch=4).loss.item()
    assert model(input_ids=ids, labels=ignored, num_items_in_batch=4, **kwargs).loss.item() == given == 0.0
    assert not torch.isnan(model(input_ids=ids, labels=_labels(ids), **kwargs).loss)
