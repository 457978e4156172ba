"""HMT in lm-evaluation-harness: the ``hmt`` model never truncates, and its numbers are the adapter's own."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import peft
import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

import fixtures  # noqa: E402
from hmt_adapter import HMTConfig  # noqa: E402
from hmt_adapter.integrations.lm_eval import HMTLM  # noqa: E402
from hmt_adapter.testing import DEFAULT_WORDS, tiny_causal_lm, tiny_tokenizer  # noqa: E402

WINDOW = 64  # the backbone's max_position_embeddings; contexts below are 3-6x longer
WORDS = [w for w in DEFAULT_WORDS if w.isalpha()]


def text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def hmt_model(recall_query: str):
    """A tiny Llama with a 64-position window and an HMT adapter whose memory visibly matters."""
    model = fixtures.perturbed_hmt_model(recall_query=recall_query)  # segment 8, Llama from tiny_causal_lm
    model.get_base_model().config.max_position_embeddings = WINDOW
    return model.eval()


def reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of the continuation's log-probabilities from the adapter's forward over the untruncated input."""
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    cont = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return sum(logp[len(ctx) + i - 1, tok].item() for i, tok in enumerate(cont))


def requests(pairs):
    return [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


PAIRS = [(text(n, seed), " " + text(k, seed + 100)) for seed, (n, k) in enumerate([(300, 3), (190, 1), (250, 5), (330, 2)])]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_previous_loglikelihood_equals_the_adapter_forward_untruncated(batch_size) -> None:
    model, tokenizer = hmt_model("previous"), tiny_tokenizer()
    lm = HMTLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm.loglikelihood(requests(PAIRS))
    for (context, continuation), (logp, _) in zip(PAIRS, results):
        assert len(tokenizer(context).input_ids) > 2 * WINDOW
        assert logp == pytest.approx(reference_loglikelihood(model, tokenizer, context, continuation), abs=1e-4)


def test_plain_hflm_would_have_truncated() -> None:
    model, tokenizer = hmt_model("previous"), tiny_tokenizer()
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    assert plain.max_length == WINDOW
    (logp, _), = plain.loglikelihood(requests(PAIRS[:1]))
    assert logp != pytest.approx(reference_loglikelihood(model, tokenizer, *PAIRS[0]), abs=1e-4)


def test_segment_mode_scores_each_request_alone_so_padding_cannot_leak() -> None:
    model, tokenizer = hmt_model("segment"), tiny_tokenizer()
    lm = HMTLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    results = lm.loglikelihood(requests(PAIRS))
    for (context, continuation), (logp, _) in zip(PAIRS, results):
        assert logp == pytest.approx(reference_loglikelihood(model, tokenizer, context, continuation), abs=1e-4)


def test_loglikelihood_rolling_is_the_whole_document() -> None:
    model, tokenizer = hmt_model("previous"), tiny_tokenizer()
    lm = HMTLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    doc = text(280, 7)
    (score,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", doc={}, arguments=(doc,), idx=0)])
    ids = [lm.prefix_token_id] + tokenizer(doc, add_special_tokens=False).input_ids  # lm-eval scores from a prefix token
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    expected = sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))
    assert score == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_the_adapters_generate_on_the_whole_context() -> None:
    model, tokenizer = hmt_model("previous"), tiny_tokenizer()
    lm = HMTLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    contexts = [text(200, 11), text(150, 12)]
    reqs = [Instance("generate_until", doc={}, arguments=(c, {"until": ["zzz"], "max_gen_toks": 6, "do_sample": False}),
                     idx=i) for i, c in enumerate(contexts)]
    outputs = lm.generate_until(reqs)
    for context, output in zip(contexts, outputs):
        ids = tokenizer(context, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            expected = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert output == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


def test_refuses_a_window_limit_and_a_missing_adapter() -> None:
    tokenizer = tiny_tokenizer()
    with pytest.raises(ValueError, match="max_length"):
        HMTLM(pretrained=hmt_model("previous"), tokenizer=tokenizer, max_length=64)
    with pytest.raises(ValueError, match="HMT adapter"):
        HMTLM(pretrained=tiny_causal_lm("llama"), tokenizer=tokenizer)
    with pytest.raises(ValueError, match="peft=ADAPTER_DIR"):
        HMTLM(pretrained="some/model")


@pytest.fixture
def saved(tmp_path):
    """A tiny base model + tokenizer and an HMT adapter on disk, and a local loglikelihood task."""
    base = tiny_causal_lm("llama", max_position_embeddings=WINDOW)
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(base, HMTConfig(segment_length=8, num_sensory=2, recall_dim=8, recall_query="previous"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".hmt_" in name:
                p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    (tmp_path / "tasks").mkdir()
    data = tmp_path / "tasks" / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"context": c, "target": t}) for c, t in PAIRS[:3]) + "\n")
    (tmp_path / "tasks" / "hmt_tiny.yaml").write_text(
        "task: hmt_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood\n"
        "doc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
    )
    return tmp_path, model.eval()


def _run_local_task(tmp_path, command: list[str], env: dict) -> None:
    """Run an lm-eval command line (``command``: the program) on the ``saved`` fixture's task, writing samples."""
    args = f"pretrained={tmp_path / 'base'},peft={tmp_path / 'adapter'},dtype=float32"
    proc = subprocess.run(
        [*command, "--model", "hmt", "--model_args", args, "--batch_size", "2", "--device", "cpu",
         "--tasks", "hmt_tiny", "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "out"),
         "--log_samples"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env=dict(env, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _assert_samples_are_the_adapters(tmp_path, model) -> None:
    samples = [p for p in (tmp_path / "out").rglob("samples_hmt_tiny_*.jsonl")]
    assert samples
    rows = [json.loads(line) for line in samples[0].read_text().splitlines()]
    tokenizer = tiny_tokenizer()
    for row in rows:
        logp = float(row["filtered_resps"][0][0])
        expected = reference_loglikelihood(model, tokenizer, row["doc"]["context"], row["doc"]["target"])
        assert logp == pytest.approx(expected, abs=1e-4)


def test_cli_runs_a_local_task_through_hmt(saved) -> None:
    tmp_path, model = saved
    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
    wrapper = [sys.executable, "-m", "hmt_adapter_cli.cli", "lm-eval"]
    _run_local_task(tmp_path, wrapper, dict(os.environ, PYTHONPATH=repo))
    _assert_samples_are_the_adapters(tmp_path, model)


def test_lm_evals_own_command_line_runs_hmt(saved) -> None:
    """`python -m lm_eval --model hmt`, without our wrapper: the installed hook registers the model
    (test_autoload.py)."""
    tmp_path, model = saved
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HMT_ADAPTER_AUTOLOAD")}
    _run_local_task(tmp_path, [sys.executable, "-m", "lm_eval"], env)
    _assert_samples_are_the_adapters(tmp_path, model)


def test_a_long_context_is_tokenized_once_for_all_its_choices() -> None:
    model, tokenizer = hmt_model("previous"), tiny_tokenizer()
    lm = HMTLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    lm.encoding_cache_min_chars = 100  # the test's contexts are ~300 words
    context = PAIRS[0][0]
    choices = [" " + w for w in WORDS[:4]]
    encoded: list[str] = []
    original = lm.tokenizer.encode
    lm.tokenizer.encode = lambda s, **kw: encoded.append(s) or original(s, **kw)
    try:
        cached = lm.loglikelihood(requests([(context, c) for c in choices]))
    finally:
        lm.tokenizer.encode = original
    assert encoded.count(context) == 1 and len(encoded) == 1 + len(choices)  # context once, context+choice each
    uncached = HMTLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    uncached.encoding_cache_min_chars = 10**9
    assert [r[0] for r in uncached.loglikelihood(requests([(context, c) for c in choices]))] == [r[0] for r in cached]
    first = lm.tok_encode(context)
    first.append(-1)  # callers get a copy: changing it leaves the cache as it was
    assert lm.tok_encode(context) == tokenizer.encode(context)
