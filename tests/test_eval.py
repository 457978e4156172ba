"""Long-document evaluation: the baselines against direct computation, the adapter's totals, the CLI."""

from __future__ import annotations

import json
import math

import peft
import pytest
import torch

from hmt_adapter import HMTConfig
from hmt_adapter.evaluation import (
    backbone_sliding_nll,
    backbone_window_nll,
    evaluate_long_documents,
    hmt_token_nll,
)
from hmt_adapter.testing import tiny_causal_lm, tiny_tokenizer


def full_context_nll(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")


@pytest.fixture
def backbone():
    return tiny_causal_lm("llama").eval()


def test_window_baseline_resets_context_at_each_window(backbone):
    ids = torch.randint(4, 128, (23,))
    torch.testing.assert_close(backbone_window_nll(backbone, ids, 64), full_context_nll(backbone, ids))
    nll = backbone_window_nll(backbone, ids, 8)
    # predictions 8..15 see only tokens 8..15: the same as scoring that window alone (plus its next token)
    torch.testing.assert_close(nll[8:16], full_context_nll(backbone, ids[8:17]))
    assert not torch.allclose(nll[8:16], full_context_nll(backbone, ids)[8:16])


def test_sliding_baseline(backbone):
    ids = torch.randint(4, 128, (30,))
    torch.testing.assert_close(backbone_sliding_nll(backbone, ids, 8, 8), backbone_window_nll(backbone, ids, 8))
    torch.testing.assert_close(backbone_sliding_nll(backbone, ids, 64, 3), full_context_nll(backbone, ids))
    nll = backbone_sliding_nll(backbone, ids, 8, 4)
    # prediction 9 is made by the window starting at 4, with tokens 4..9 as context
    expected = full_context_nll(backbone, ids[4:11])[5]
    torch.testing.assert_close(nll[9], expected)
    with pytest.raises(ValueError, match="stride"):
        backbone_sliding_nll(backbone, ids, 8, 9)


def test_evaluate_long_documents_totals_and_recall_histogram():
    model = peft.get_peft_model(tiny_causal_lm("llama"), HMTConfig(task_type="CAUSAL_LM", segment_length=8, num_sensory=2, recall_dim=8))
    docs = [torch.randint(4, 128, (30,)), list(range(4, 21))]
    seen = []
    result = evaluate_long_documents(model, docs, recall_histogram=True, progress=lambda it: seen.append(1) or it)
    assert seen and result.num_documents == 2 and result.window == 8 and result.stride == 4
    out = result.to_dict()
    json.dumps(out)
    for name, m in out["methods"].items():
        assert m["num_targets"] == 29 + 16
        assert sum(m["segment_count"]) == m["num_targets"]
        assert m["segment_count"][:3] == [16, 16, 8]  # predictions 0..7 of both docs, then 8..15, ...
        weighted = sum(l * c for l, c in zip(m["segment_loss"], m["segment_count"])) / m["num_targets"]
        assert math.isclose(weighted, m["loss"], rel_tol=1e-6)
        assert math.isclose(m["perplexity"], math.exp(m["loss"]), rel_tol=1e-9)
    # the adapter's numbers are the forward's own
    expected = (hmt_token_nll(model, docs[0]).sum() + hmt_token_nll(model, torch.tensor(docs[1])).sum()) / 45
    assert math.isclose(out["methods"]["hmt"]["loss"], float(expected), rel_tol=1e-5)
    # the baselines are the backbone alone
    with model.disable_adapter():
        base = model.get_base_model()
        ref = (backbone_window_nll(base, docs[0], 8).sum() + backbone_window_nll(base, torch.tensor(docs[1]), 8).sum()) / 45
    assert math.isclose(out["methods"]["backbone_window"]["loss"], float(ref), rel_tol=1e-5)
    # every recall's weights sum to 1: doc 0 recalls at segments 1..3 (3 times), doc 1 at segments 1..2 (2 times)
    assert math.isclose(sum(result.recall_distance), 5.0, rel_tol=1e-5)
    assert len(result.recall_distance) == 3  # at most 3 memories back
    assert result.recall_distance_available == [5, 3, 1]  # distance 1 at every recall, 3 only at doc 0's segment 3
    assert all(0 < w <= 1 for w in out["recall_distance_mean_weight"])
    assert model.training  # the train/eval mode is restored


def test_cli_eval_writes_json_and_plot(tmp_path):
    from hmt_adapter_cli.cli import main

    model = peft.get_peft_model(tiny_causal_lm("llama"), HMTConfig(task_type="CAUSAL_LM", segment_length=8, num_sensory=2, recall_dim=8))
    model.save_pretrained(tmp_path / "adapter")
    tiny_tokenizer().save_pretrained(tmp_path / "adapter")
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": "the cat sees the dog . " * k}) for k in (3, 4)))
    out, png = tmp_path / "eval" / "results.json", tmp_path / "eval" / "loss.png"
    code = main([
        "eval", "--adapter", str(tmp_path / "adapter"), "--model", "hmt-testing:llama", "--data-files", str(data),
        "--device", "cpu", "--recall-histogram", "--output-dir", str(tmp_path / "eval"), "--threads", "1",
    ])
    assert code == 0
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"hmt", "backbone_window", "backbone_sliding"}
    assert result["num_documents"] == 2 and result["recall_distance_fraction"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_eval_reports_a_missing_base_model(tmp_path, capsys):
    from hmt_adapter_cli.cli import main

    model = peft.get_peft_model(tiny_causal_lm("llama"), HMTConfig(task_type="CAUSAL_LM", segment_length=8, recall_dim=8))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--adapter", str(tmp_path / "adapter"), "--data-files", "x.jsonl"])
    assert exc.value.code == 2
    assert "--model" in capsys.readouterr().err
