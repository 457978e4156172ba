"""recall_null=True: one more recall entry, keyed W_k n (a learned vector n) and valued m_0 (a recall that can read
nothing); off, recall is the paper's."""

import peft
import pytest
import torch
from safetensors.torch import load_file

import fixtures
from hmt_adapter import HMTConfig
from hmt_adapter.engine.memory import HMTParams, recall

SEG = 8
D, H, N = 6, 4, 5


def params(null=None, **overrides) -> HMTParams:
    gen = torch.Generator().manual_seed(0)
    fields = dict(memory_init=torch.randn(D, generator=gen), summary_token=None, write_token=None,
                  w_q=torch.randn(H, D, generator=gen), w_k=torch.randn(H, D, generator=gen), memory_proj=None,
                  memory_gate=None, embed_norm=torch.ones(()), recall_null=null)
    fields.update(overrides)
    return HMTParams(**fields)


def memories(p: HMTParams, batch: int = 3):
    gen = torch.Generator().manual_seed(1)
    query, values = torch.randn(batch, D, generator=gen), torch.randn(batch, N, D, generator=gen)
    return query, values, values @ p.w_k.T


def test_the_null_slot_reads_m0_by_its_share_of_the_softmax():
    null = torch.randn(D, generator=torch.Generator().manual_seed(2))
    p = params(null)
    query, values, keys = memories(p)
    memory, weights = recall(query, values, keys, p)
    q = query @ p.w_q.T
    scores = torch.cat([(q @ (p.w_k @ null)).unsqueeze(-1), torch.einsum("bh,bnh->bn", q, keys)], -1) / H ** 0.5
    full = scores.softmax(-1)  # null first
    assert weights.shape == (3, N)
    torch.testing.assert_close(weights, full[:, 1:])
    torch.testing.assert_close(memory, full[:, :1] * p.memory_init + torch.einsum("bn,bnd->bd", full[:, 1:], values))
    assert (weights.sum(-1) < 1).all()  # what the observers see: the memories' share, not the null slot's


def test_a_null_key_that_wins_reads_m0_and_one_that_loses_is_the_paper_recall():
    p = params()
    query, values, keys = memories(p)
    q = query @ p.w_q.T
    # n such that W_k n = +/- c * (mean query direction): every query here scores it far above (or below) any memory
    direction = torch.linalg.lstsq(p.w_k, q.mean(0, keepdim=True).T).solution.squeeze(-1)
    assert ((q @ (p.w_k @ direction)) > 0).all()
    wins, loses = params(1e4 * direction), params(-1e4 * direction)
    memory, weights = recall(query, values, keys, wins)
    torch.testing.assert_close(memory, p.memory_init.expand(3, D))
    assert weights.max() < 1e-6
    paper_memory, paper_weights = recall(query, values, keys, p)
    memory, weights = recall(query, values, keys, loses)
    torch.testing.assert_close(memory, paper_memory)
    torch.testing.assert_close(weights, paper_weights)


def test_log_n_counts_the_null_slot():
    null = torch.randn(D, generator=torch.Generator().manual_seed(3))
    plain, scaled = params(null), params(null, recall_log_n=True)
    query, values, keys = memories(plain)
    q = query @ plain.w_q.T
    scores = torch.cat([(q @ (plain.w_k @ null)).unsqueeze(-1), torch.einsum("bh,bnh->bn", q, keys)], -1) / H ** 0.5
    _, weights = recall(query, values, keys, scaled)
    torch.testing.assert_close(weights, (scores * torch.log(torch.tensor(N + 1.0))).softmax(-1)[:, 1:])
    _, unscaled = recall(query, values, keys, plain)
    assert not torch.allclose(weights, unscaled)


def test_the_null_vector_is_an_adapter_parameter_that_learns_and_round_trips(tmp_path):
    fresh = peft.get_peft_model(fixtures.tiny_causal_lm("llama"),
                                HMTConfig(segment_length=SEG, recall_dim=16, recall_null=True))
    nulls = {n: p for n, p in fresh.named_parameters() if "hmt_recall_null" in n}
    assert len(nulls) == 1 and all(p.requires_grad and p.shape == (64,) for p in nulls.values())
    assert not any("hmt_recall_null" in n for n, _ in fixtures.perturbed_hmt_model(segment_length=SEG).named_parameters())
    model = fixtures.perturbed_hmt_model(segment_length=SEG, write_token="learned", recall_null=True).train()
    ids = torch.randint(4, 128, (2, 4 * SEG + 1))
    model(input_ids=ids, labels=ids).loss.backward()
    grad = next(p.grad for n, p in model.named_parameters() if "hmt_recall_null" in n)
    assert grad is not None and grad.abs().max() > 0
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert any(k.endswith("hmt_recall_null") for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = peft.PeftModel.from_pretrained(fixtures.tiny_causal_lm("llama"), tmp_path).eval()
    assert loaded.peft_config["default"].recall_null is True
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)


def test_the_null_slot_changes_what_later_segments_read():
    ids = torch.randint(4, 128, (1, 4 * SEG + 3))
    with_null = fixtures.perturbed_hmt_model(segment_length=SEG, write_token="learned", recall_null=True).eval()
    plain = fixtures.perturbed_hmt_model(segment_length=SEG, write_token="learned").eval()
    with torch.no_grad():
        source = dict(with_null.named_parameters())
        for name, param in plain.named_parameters():
            param.copy_(source[name])
        a, b = with_null(input_ids=ids).logits, plain(input_ids=ids).logits
    torch.testing.assert_close(a[:, :SEG], b[:, :SEG])  # segment 0 reads m_0 either way
    assert (a[:, 2 * SEG:] - b[:, 2 * SEG:]).abs().max() > 1e-3


def test_null_slot_needs_recall():
    with pytest.raises(ValueError, match="recall_null"):
        HMTConfig(recall_null=True, use_recall=False)
    with pytest.raises(TypeError, match="recall_null"):
        HMTConfig(recall_null="yes")
