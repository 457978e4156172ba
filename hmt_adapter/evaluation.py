"""Long-document evaluation of an HMT adapter against its backbone alone (pure computation).

Three ways to score every next-token target of a document ``ids`` (T tokens, T - 1 targets; the prediction
made at position j scores token j + 1, and belongs to "segment" ``j // segment_length``):

* ``hmt``: the adapter, segment by segment with memory (one forward over the whole document).
* ``backbone_window``: the backbone alone over independent windows of ``window`` tokens (the context is cut at
  every window border; window = segment_length by default: the same token layout HMT uses, without memory).
* ``backbone_sliding``: the backbone alone over a sliding window of the same width moved by ``stride``
  tokens; each target is scored once, with at least ``window - stride`` tokens of context. It costs about
  ``window / stride`` times the compute of the windowed baseline.

Nothing here prints or plots: `hmt_adapter_cli.cli` (``hmt-adapter eval``) adds the progress bar, the JSON file and
the plot.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from .tuner.config import HMTConfig
from .engine import observe_recall

METHODS = ("hmt", "backbone_window", "backbone_sliding")
Document = Union[torch.Tensor, Sequence[int]]


def _as_ids(document: Document, device: torch.device) -> torch.Tensor:
    ids = document if isinstance(document, torch.Tensor) else torch.tensor(list(document), dtype=torch.long)
    ids = ids.to(device=device, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"A document must be a 1-D sequence of token ids (or shape (1, T)), got shape {tuple(ids.shape)}.")
    return ids


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def hmt_token_nll(peft_model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Per-target NLL under the HMT adapter.

    Args:
        peft_model: a `PeftModel` with an active HMT adapter.
        ids: (T,) token ids.

    Returns:
        (T - 1,) float32: entry j is -log p(ids[j + 1] | ids[: j + 1], memory).
    """
    row = ids.unsqueeze(0)
    out = peft_model(input_ids=row, labels=row, fused_lm_head=True)
    return -out.log_probs[0].float()


def _target_nll(model: Any, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of ``targets`` (n,) predicted at the first n positions of ``inputs`` (m >= n,) by ``model`` alone."""
    logits = model(input_ids=inputs.unsqueeze(0)).logits[0, : targets.shape[0]].float()  # (n, V)
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


@torch.no_grad()
def backbone_window_nll(model: Any, ids: torch.Tensor, window: int) -> torch.Tensor:
    """Per-target NLL of ``model`` over independent windows of ``window`` input tokens: (T - 1,).

    Window c holds positions ``[c * window, (c + 1) * window)``; their predictions score the targets
    ``c * window + 1 .. (c + 1) * window``, with no context from earlier windows.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}.")
    out = ids.new_zeros(ids.shape[0] - 1, dtype=torch.float32)
    for start in range(0, ids.shape[0] - 1, window):
        end = min(start + window, ids.shape[0] - 1)
        out[start:end] = _target_nll(model, ids[start:end], ids[start + 1 : end + 1])
    return out


@torch.no_grad()
def backbone_sliding_nll(model: Any, ids: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Per-target NLL of ``model`` over a sliding window of ``window`` tokens moved by ``stride``: (T - 1,).

    Every target is scored once, by the first window that predicts it after the previous window's last
    prediction, so it sees at least ``window - stride`` tokens of context (all of them early in the document).
    """
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}.")
    num_targets = ids.shape[0] - 1
    out = ids.new_zeros(num_targets, dtype=torch.float32)
    scored = 0  # predictions 0 .. scored - 1 are done
    begin = 0
    while scored < num_targets:
        end = min(begin + window, num_targets)
        nll = _target_nll(model, ids[begin:end], ids[begin + 1 : end + 1])  # predictions begin .. end - 1
        out[scored:end] = nll[scored - begin :]
        scored = end
        begin += stride
    return out


@dataclass
class MethodResult:
    """Totals of one scoring method over all documents."""

    nll_sum: float = 0.0
    num_targets: int = 0
    segment_nll_sum: list[float] = field(default_factory=list)
    segment_count: list[int] = field(default_factory=list)

    def add(self, nll: torch.Tensor, segment_length: int) -> None:
        """Accumulate one document's per-target NLL (T - 1,)."""
        self.nll_sum += float(nll.double().sum())
        self.num_targets += nll.numel()
        segments = torch.arange(nll.numel(), device=nll.device) // segment_length
        num = int(segments.max()) + 1 if nll.numel() else 0
        sums = torch.zeros(num, dtype=torch.float64, device=nll.device).index_add_(0, segments, nll.double())
        counts = torch.bincount(segments, minlength=num)
        for n in range(num):
            if n == len(self.segment_count):
                self.segment_nll_sum.append(0.0)
                self.segment_count.append(0)
            self.segment_nll_sum[n] += float(sums[n])
            self.segment_count[n] += int(counts[n])

    @property
    def loss(self) -> float:
        return self.nll_sum / max(self.num_targets, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def segment_loss(self) -> list[float]:
        """Mean NLL by segment index (predictions made at positions of segment n)."""
        return [s / c if c else float("nan") for s, c in zip(self.segment_nll_sum, self.segment_count)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "num_targets": self.num_targets,
            "segment_loss": self.segment_loss,
            "segment_count": list(self.segment_count),
        }


@dataclass
class EvalResult:
    """Result of `evaluate_long_documents`; ``to_dict()`` is JSON-ready."""

    segment_length: int
    window: int
    stride: int
    recall_query: str
    use_recall: bool
    num_documents: int = 0
    methods: dict[str, MethodResult] = field(default_factory=dict)
    recall_distance: Optional[list[float]] = None  # recall weight by distance 1..N (segments back), summed
    recall_distance_available: Optional[list[int]] = None  # recalls in which distance d could be chosen

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["methods"] = {name: result.to_dict() for name, result in self.methods.items()}
        if self.recall_distance is not None:
            total = sum(self.recall_distance)
            out["recall_distance_fraction"] = [w / total for w in self.recall_distance] if total else None
            # mean weight on distance d when it was available: uniform attention over N memories gives 1/N
            out["recall_distance_mean_weight"] = [
                w / n if n else 0.0 for w, n in zip(self.recall_distance, self.recall_distance_available or [])
            ]
        return out


class _RecallHistogram:
    """Accumulates recall weight by distance: entry i of N cached memories lies N - i segments back."""

    def __init__(self) -> None:
        self.weight: list[float] = []
        self.available: list[int] = []  # recalls (rows) in which a memory that far back existed

    def __call__(self, weights: torch.Tensor) -> None:
        per_entry = weights.double().sum(0)  # (N,) summed over the batch, oldest first
        by_distance = per_entry.flip(0).tolist()  # distance 1 .. N
        if len(by_distance) > len(self.weight):
            grow = len(by_distance) - len(self.weight)
            self.weight.extend([0.0] * grow)
            self.available.extend([0] * grow)
        for d, w in enumerate(by_distance):
            self.weight[d] += w
            self.available[d] += weights.shape[0]


def evaluate_long_documents(
    peft_model: Any,
    documents: Iterable[Document],
    *,
    window: Optional[int] = None,
    stride: Optional[int] = None,
    methods: Sequence[str] = METHODS,
    recall_histogram: bool = False,
    progress: Optional[Callable[[Iterable], Iterable]] = None,
) -> EvalResult:
    """Score each document with the adapter and with the backbone alone (see the module docstring).

    Args:
        peft_model: a `PeftModel` with an active HMT adapter, already on its device and dtype (the documents are
            moved to the model's device).
        documents: token-id sequences (T,), each with at least 2 tokens, read one at a time (batch size 1).
        window: width of the backbone baselines; default ``segment_length``.
        stride: sliding-window stride; default ``window // 2``.
        methods: subset of ``("hmt", "backbone_window", "backbone_sliding")``.
        recall_histogram: also record how far back (in segments) the recall attention looks.
        progress: optional wrapper of the document iterable (e.g. ``tqdm.tqdm``).

    Returns:
        An `EvalResult` with, per method, loss, perplexity and loss by segment index.
    """
    config = peft_model.active_peft_config
    if not isinstance(config, HMTConfig):
        raise ValueError("evaluate_long_documents needs a PeftModel whose active adapter is an HMT adapter.")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"Unknown evaluation methods {unknown}; choose from {METHODS}.")
    window = config.segment_length if window is None else int(window)
    stride = max(1, window // 2) if stride is None else int(stride)
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}.")
    result = EvalResult(config.segment_length, window, stride, config.recall_query, config.use_recall)
    result.methods = {name: MethodResult() for name in methods}
    histogram = _RecallHistogram() if recall_histogram and config.use_recall else None
    device = _model_device(peft_model)
    was_training = peft_model.training
    peft_model.eval()
    try:
        for document in progress(documents) if progress is not None else documents:
            ids = _as_ids(document, device)
            if ids.shape[0] < 2:
                raise ValueError("Every document needs at least 2 tokens (one next-token target).")
            result.num_documents += 1
            _score_document(peft_model, ids, result, histogram)
    finally:
        peft_model.train(was_training)
    if histogram is not None:
        result.recall_distance = histogram.weight
        result.recall_distance_available = histogram.available
    return result


def _score_document(peft_model: Any, ids: torch.Tensor, result: EvalResult, histogram: Optional[_RecallHistogram]) -> None:
    seg_len = result.segment_length
    if "hmt" in result.methods:
        with observe_recall(histogram) if histogram is not None else contextlib.nullcontext():
            result.methods["hmt"].add(hmt_token_nll(peft_model, ids), seg_len)
    baselines = [m for m in ("backbone_window", "backbone_sliding") if m in result.methods]
    if not baselines:
        return
    with peft_model.disable_adapter():  # the backbone alone (LoRA of HMT + LoRA disabled too)
        backbone = peft_model.get_base_model()
        if "backbone_window" in result.methods:
            result.methods["backbone_window"].add(backbone_window_nll(backbone, ids, result.window), seg_len)
        if "backbone_sliding" in result.methods:
            nll = backbone_sliding_nll(backbone, ids, result.window, result.stride)
            result.methods["backbone_sliding"].add(nll, seg_len)
