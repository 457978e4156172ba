"""benchmarks/quality.py without the Debian corpus: corpus helpers (benchmarks/lab/corpus.py) on a synthetic
directory, the compute accounting checked against what the evaluation and HMT actually run, the plateau rule
(benchmarks/lab/pretrain.py), and LoRA alone on a tiny model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import peft
import pytest
import torch
from datasets import Dataset
from peft.tuners.lora import LoraLayer

import hmt_adapter  # noqa: F401  (registers the HMT adapter type with PEFT)
from benchmarks import quality
from benchmarks.lab import corpus, pretrain
from benchmarks.lab.backbone import llama
from benchmarks.lab.tokenizer import train_tokenizer
from hmt_adapter import HMTConfig, evaluation


def _write_corpus(root: Path, count: int = 40) -> list[str]:
    names = []
    for i in range(count):
        rel = f"sub{i % 3}/doc{i}.rst.txt"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"Title {i}\n" + "word " * (i + 1))
        names.append(rel)
    (root / "sub0" / "notes.txt").write_text("not a document")  # wrong suffix: ignored
    return sorted(names)


def test_list_documents_finds_rst_txt_files_relative_and_sorted(tmp_path: Path) -> None:
    names = _write_corpus(tmp_path)
    assert corpus.list_documents(str(tmp_path)) == names
    assert corpus.list_documents(str(tmp_path / "absent")) == []


def test_split_is_a_deterministic_partition_by_path(tmp_path: Path) -> None:
    names = _write_corpus(tmp_path, count=200)
    train, heldout = corpus.split_documents(names, 0.2)
    assert sorted(train + heldout) == names and not set(train) & set(heldout)
    assert 10 <= len(heldout) <= 70  # ~40 expected from a uniform hash
    # depends on the path only: same answer for any order or subset of the paths
    assert corpus.split_documents(list(reversed(names)), 0.2)[1] == list(reversed(heldout))
    assert [p for p in names[:50] if corpus.is_heldout(p, 0.2)] == [p for p in heldout if p in names[:50]]
    with pytest.raises(ValueError, match="heldout_fraction"):
        corpus.split_documents(names, 1.0)


def test_eval_documents_filters_short_and_truncates_long() -> None:
    docs = [list(range(10)), list(range(40)), list(range(100)), list(range(17))]
    out = corpus.eval_documents(docs, segment_length=8, min_segments=2, max_segments=3)
    assert out == [list(range(24)), list(range(24)), list(range(17))]
    assert corpus.eval_documents(docs, 8, 2, 3, max_documents=1) == [list(range(24))]


def test_missing_corpus_names_the_install_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert quality.main(["--corpus-dir", str(tmp_path), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "apt-get install -y python3-doc" in err and str(tmp_path) in err
    assert "apt-get install -y python3-doc" in (quality.__doc__ or "")


# ---- the controls: compute accounting, the equal-compute stride, the plateau rule, LoRA alone -----------------
class _CountingLM(torch.nn.Module):
    """A stand-in causal LM that records how many positions each forward gets (logits are zeros)."""

    def __init__(self, vocab: int = 11) -> None:
        super().__init__()
        self.vocab, self.positions = vocab, 0

    def forward(self, input_ids: torch.Tensor):
        self.positions += input_ids.numel()
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


@pytest.mark.parametrize("num_tokens", [2, 9, 40, 41, 100])
@pytest.mark.parametrize("window,stride", [(8, 8), (8, 4), (8, 5), (8, 1), (16, 7)])
def test_position_counts_match_what_the_evaluation_runs(num_tokens: int, window: int, stride: int) -> None:
    ids = torch.randint(0, 11, (num_tokens,))
    lm = _CountingLM()
    evaluation.backbone_sliding_nll(lm, ids, window, stride)
    assert quality.sliding_positions(num_tokens, window, stride) == lm.positions
    lm = _CountingLM()
    evaluation.backbone_window_nll(lm, ids, window)
    assert quality.window_positions(num_tokens, window) == lm.positions
    with pytest.raises(ValueError, match="stride"):
        quality.sliding_positions(num_tokens, window, window + 1)


@pytest.mark.parametrize("recall_query,use_recall", [("segment", True), ("previous", True), ("segment", False)])
@pytest.mark.parametrize("num_tokens", [5, 8, 21, 32, 31])
def test_hmt_positions_count_every_backbone_pass(recall_query: str, use_recall: bool, num_tokens: int) -> None:
    """Segment passes + summary passes of a real HMT forward, counted at the decoder's input. Lengths are chosen
    so the batched summary pass has no padding (a last segment of >= summary_length tokens, or a single one)."""
    base = llama(64, 32, 2, 2, 64, 64, True)
    config = HMTConfig(task_type="CAUSAL_LM", segment_length=8, num_sensory=3, recall_dim=16,
                       recall_query=recall_query, use_recall=use_recall)
    model = peft.get_peft_model(base, config).eval()
    seen = []
    hook = base.model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[:2]), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.randint(3, 64, (1, num_tokens)))
    hook.remove()
    assert quality.hmt_positions(num_tokens, config) == sum(b * p for b, p in seen)


def test_nominal_hmt_compute_and_the_matching_stride() -> None:
    config = quality.hmt_config(quality.QualitySettings(), lora=False)
    # the full run: segment 128, sensory 16, summary 64 tokens -> (128 + 16 + 2 + 64 + 2) / 128
    assert quality.nominal_hmt_positions_per_token(config) == pytest.approx(212 / 128)
    no_recall = HMTConfig(task_type="CAUSAL_LM", segment_length=128, num_sensory=16, use_recall=False)
    assert quality.nominal_hmt_positions_per_token(no_recall) == pytest.approx(146 / 128)
    # a long document: HMT's counted compute tends to the nominal one, and the stride to 128 / 1.656 = 77.3
    long_doc = [list(range(200 * 128))]
    counted = quality.positions_per_token(long_doc, lambda t: quality.hmt_positions(t, config))
    assert counted == pytest.approx(212 / 128, rel=0.01)
    assert quality.matching_stride(long_doc, 128, counted) == 77
    # on any documents, no other stride comes closer to the target
    docs = [list(range(n)) for n in (300, 517, 1200)]
    target = 1.5
    chosen = quality.matching_stride(docs, 64, target)

    def gap(stride: int) -> float:
        return abs(quality.positions_per_token(docs, lambda t: quality.sliding_positions(t, 64, stride)) - target)

    assert all(gap(chosen) <= gap(s) for s in range(1, 65))
    assert quality.matching_stride(docs, 64, 1.0) == 64  # no sliding window is cheaper than independent windows


def test_plateau_rule() -> None:
    assert not pretrain.plateaued([5.0, 4.0, 3.9], window=3, tolerance=0.005)  # too few checks
    assert not pretrain.plateaued([5.0, 4.0, 3.9, 3.8], window=3, tolerance=0.005)  # 5% better than 4 checks ago
    assert pretrain.plateaued([4.0, 3.999, 3.998, 3.997], window=3, tolerance=0.005)
    assert pretrain.plateaued([4.0, 4.01, 4.02, 4.03], window=3, tolerance=0.005)  # rising: flat or worse
    assert not pretrain.plateaued([4.0, 4.1, 4.1, 3.9], window=3, tolerance=0.005)  # the best of the window counts
    with pytest.raises(ValueError, match="plateau_checks"):
        pretrain.plateaued([1.0, 1.0], window=0, tolerance=0.1)


def test_validation_split_is_inside_training_and_disjoint(tmp_path: Path) -> None:
    names = _write_corpus(tmp_path, count=300)
    train, _ = corpus.split_documents(names, 0.15)
    fit, val = corpus.split_validation(train, 0.1)
    assert sorted(fit + val) == sorted(train) and not set(fit) & set(val)
    assert 5 <= len(val) <= 60
    windows = pretrain.validation_windows(torch.arange(1000), 32, 8)
    assert windows.shape == (8, 32) and windows[0, 0] == 0 and windows[-1, -1] == 999


def test_to_windows_cuts_rows_into_independent_windows() -> None:
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    out = quality.to_windows({"input_ids": ids, "labels": labels, "attention_mask": mask}, width=4, pad_token_id=0)
    # row 0: [1-4] [5-8] [9,10,pad,pad]; row 1: [11-14], [15,pad..] has one real token -> dropped; [pad..] dropped
    assert out["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0], [11, 12, 13, 14]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert out["labels"].tolist() == [[-100, 2, 3, 4], [-100, 6, 7, 8], [-100, 10, -100, -100], [-100, 12, 13, 14]]
    # the labels scored are exactly the targets each window predicts: T - 1 per window
    assert int((out["labels"] != -100).sum()) == sum(int(m.sum()) - 1 for m in out["attention_mask"])


def test_lora_alone_wraps_hmt_loras_modules_and_trains_only_lora(tmp_path: Path) -> None:
    settings = quality.quick_settings(segment_length=8, hmt_steps=4, hmt_batch=2, train_segments=3, lora_r=2)
    tokenizer = train_tokenizer(["some text to train a byte-level tokenizer on"] * 4, vocab_size=300)
    vocab = len(tokenizer)

    def backbone():
        base = llama(vocab, 32, 2, 2, 64, 64, True, seed=0, pad_token_id=0)
        return base.requires_grad_(False)

    hmt_lora = peft.get_peft_model(backbone(), quality.hmt_config(settings, lora=True))
    hmt_wrapped = sorted(n.removeprefix("base_model.model.").removesuffix(".base_layer")
                         for n, m in hmt_lora.named_modules() if type(m).__name__ == "HMTLoraLinear")
    model = quality.lora_only_model(backbone(), settings)
    lora_wrapped = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                          if isinstance(m, LoraLayer))
    assert lora_wrapped == hmt_wrapped and len(hmt_wrapped) == 2 * 7  # q k v o gate up down, 2 layers
    lora_count = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert lora_count == sum(p.numel() for n, p in hmt_lora.named_parameters() if "lora" in n.lower())
    assert model.peft_config["default"].r == 2 and model.peft_config["default"].lora_alpha == settings.lora_alpha

    pieces = [torch.randint(3, vocab, (n,)).tolist() for n in (24, 20, 16, 24, 17, 24, 22, 24)]
    dataset = Dataset.from_dict({"input_ids": pieces})
    collator = quality.window_collator(tokenizer.pad_token_id, settings.segment_length)
    widths = []
    call = collator.torch_call
    collator.torch_call = lambda examples: widths.append(call(examples)["input_ids"].shape[1]) or call(examples)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quality.train_adapter(model, tokenizer, dataset, settings, str(tmp_path / "trainer"), collator)
    assert widths and set(widths) == {settings.segment_length}  # LoRA alone saw windows, not whole pieces
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    lora_params = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert lora_params and changed == lora_params
