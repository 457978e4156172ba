"""recall_scale="log_n": recall scores scaled by ln N, N the memories recalled over (the default is the paper's)."""

import math

import peft
import torch

import fixtures
from hmt_adapter import HMTConfig
from hmt_adapter.engine.memory import observe_recall, recall
from hmt_adapter.inference.streaming import HMTStreamer

SEG = 8


def soft_recall_model(**overrides):
    """The perturbed tiny model with its recall scores shrunk so the softmax is soft (a scale then shows)."""
    model = fixtures.perturbed_hmt_model(segment_length=SEG, write_token="learned", **overrides)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "hmt_recall" in name:
                param.mul_(0.3)
    return model


def scaled_model(**overrides):
    return soft_recall_model(recall_scale="log_n", **overrides)


def test_log_n_recall_is_the_paper_softmax_with_scores_times_ln_n():
    torch.manual_seed(0)
    model = scaled_model()
    layer_params = next(m for m in model.modules() if hasattr(m, "hmt_memory_init") and hasattr(m, "params"))
    params = layer_params.params("default", model.peft_config["default"])
    assert params.recall_log_n
    d, h = params.w_q.shape[1], params.w_q.shape[0]
    for n in (1, 2, 7, 300):
        query, values = torch.randn(2, d), torch.randn(2, n, d)
        keys = torch.nn.functional.linear(values, params.w_k)
        memory, weights = recall(query, values, keys, params)
        scores = torch.einsum("bh,bnh->bn", torch.nn.functional.linear(query, params.w_q), keys) / math.sqrt(h)
        expected = (scores * math.log(n)).softmax(-1)
        torch.testing.assert_close(weights, expected)
        torch.testing.assert_close(memory, torch.einsum("bn,bnd->bd", expected, values))


def test_log_n_changes_the_forward_round_trips_and_streams_like_the_forward(tmp_path):
    ids = torch.randint(4, 128, (2, 5 * SEG + 3))
    scaled = scaled_model(seed=3)
    plain = soft_recall_model(seed=3)
    seen: list[torch.Tensor] = []
    unscaled: list[torch.Tensor] = []
    with torch.no_grad():
        with observe_recall(seen.append):
            ref = scaled(input_ids=ids).logits
        with observe_recall(unscaled.append):
            plain_logits = plain(input_ids=ids).logits
    # segment 1 recalls over one memory (ln 1 = 0: all weight on it, as without the scale); later ones sharpen
    assert [w.shape[-1] for w in seen] == [w.shape[-1] for w in unscaled] == [1, 2, 3, 4, 5]
    torch.testing.assert_close(ref[:, : 2 * SEG], plain_logits[:, : 2 * SEG])
    for sharp, soft in zip(seen[2:], unscaled[2:]):  # ln N > 1: the largest weight grows
        assert (sharp.max(-1).values > soft.max(-1).values).all()
    scaled.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(fixtures.tiny_causal_lm("llama"), tmp_path).eval()
    assert loaded.peft_config["default"].recall_scale == "log_n"
    reloaded: list[torch.Tensor] = []
    streamed: list[torch.Tensor] = []
    with torch.no_grad():
        with observe_recall(reloaded.append):
            assert torch.equal(loaded(input_ids=ids).logits, ref)
        streamer = HMTStreamer(scaled)
        state = streamer.init_state(2)
        with observe_recall(streamed.append):
            released, state = streamer.feed(ids[:, :13], state)
            more, state = streamer.feed(ids[:, 13:], state)
            rest, _ = streamer.finish(state)
    torch.testing.assert_close(torch.cat([released, more, rest], 1), ref, atol=1e-5, rtol=1e-4)
    for observed in (reloaded, streamed):  # the saved config and the stream both read with the scale
        assert len(observed) == len(seen)
        for a, b in zip(observed, seen):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_default_is_the_paper_recall():
    assert HMTConfig().recall_scale == "constant"


# ---- recall_sharpen_beyond=K: the paper's recall up to K memories, scores times ln N / ln K beyond ---------------------
def test_sharpen_beyond_k_is_the_paper_recall_up_to_k_and_ln_n_over_ln_k_beyond():
    torch.manual_seed(0)
    model = soft_recall_model(recall_sharpen_beyond=4)
    layer = next(m for m in model.modules() if hasattr(m, "hmt_memory_init") and hasattr(m, "params"))
    params = layer.params("default", model.peft_config["default"])
    assert params.recall_sharpen_beyond == 4 and not params.recall_log_n
    d, h = params.w_q.shape[1], params.w_q.shape[0]
    for n in (1, 3, 4, 5, 300):
        query, values = torch.randn(2, d), torch.randn(2, n, d)
        keys = torch.nn.functional.linear(values, params.w_k)
        _, weights = recall(query, values, keys, params)
        scores = torch.einsum("bh,bnh->bn", torch.nn.functional.linear(query, params.w_q), keys) / math.sqrt(h)
        factor = max(1.0, math.log(n) / math.log(4))
        torch.testing.assert_close(weights, (scores * factor).softmax(-1))
        if n > 4:  # sharper than the paper's softmax
            assert (weights.max(-1).values > scores.softmax(-1).max(-1).values).all()


def test_sharpen_beyond_set_after_training_changes_only_segments_past_k_and_round_trips(tmp_path):
    ids = torch.randint(4, 128, (2, 6 * SEG + 3))
    plain = soft_recall_model(seed=5)
    with torch.no_grad():
        ref = plain(input_ids=ids).logits
    plain.peft_config["default"].recall_sharpen_beyond = 3  # an inference-only setting of a trained adapter
    seen: list[torch.Tensor] = []
    with torch.no_grad(), observe_recall(seen.append):
        sharp = plain(input_ids=ids).logits
    assert [w.shape[-1] for w in seen] == [1, 2, 3, 4, 5, 6]
    # segments 1-3 recall over at most 3 memories: the paper's recall; segment 4 (4 memories) on reads sharper
    torch.testing.assert_close(sharp[:, : 4 * SEG], ref[:, : 4 * SEG])
    assert not torch.allclose(sharp[:, 4 * SEG :], ref[:, 4 * SEG :])
    plain.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(fixtures.tiny_causal_lm("llama"), tmp_path).eval()
    assert loaded.peft_config["default"].recall_sharpen_beyond == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, sharp)


def test_sharpen_beyond_is_off_by_default():
    assert HMTConfig().recall_sharpen_beyond == 0
