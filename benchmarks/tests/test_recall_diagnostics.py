"""`benchmarks.recall_diagnostics.summarise`: the answer split by whether recall found the needle's segment."""

import torch

from benchmarks.recall_diagnostics import summarise


def row(segment: int, argmax: int, correct: bool, answer: int, segments: int = 4) -> dict:
    weights = torch.full((segments,), 0.1)
    weights[argmax] = 1.0
    memories = torch.randn(segments + 1, 8)
    return {"segment": segment, "segments": segments + 1, "answer": answer, "correct": correct,
            "last_recall": weights / weights.sum(), "memories": memories}


def test_summarise_separates_recall_misses_from_read_misses():
    torch.manual_seed(0)
    rows = [row(1, 1, True, 0), row(2, 2, True, 1), row(3, 3, False, 2),  # recall found: 2 of 3 right
            row(0, 2, False, 0), row(1, 3, True, 1)]  # recall missed: 1 of 2 right
    result = summarise(rows, keys=3)
    assert result["recall_found"] == 3 / 5
    assert abs(result["accuracy_recall_found"] - 2 / 3) < 1e-9
    assert result["accuracy_recall_missed"] == 1 / 2
    assert result["accuracy"] == 3 / 5
    by_segment = {p["segment"]: p for p in result["per_segment"]}
    assert by_segment[1]["recall_top1"] == 1 / 2  # segment 1: found once, missed once


def test_summarise_without_recall_reports_no_split():
    rows = [dict(row(1, 1, True, 0), last_recall=None), dict(row(2, 2, False, 1), last_recall=None)]
    result = summarise(rows, keys=2)
    assert result["recall_found"] is None
    assert result["accuracy_recall_found"] is None and result["accuracy_recall_missed"] is None


def test_binned_means_are_example_weighted():
    from benchmarks.recall_diagnostics import binned

    per_segment = [{"segment": i, "n": 1 + (i % 2), "accuracy": float(i % 2), "recall_weight": 0.5} for i in range(64)]
    segs, weight, accuracy = binned(per_segment, bins=32)
    assert len(segs) == 32 and segs[0] == 0.5
    assert weight == [0.5] * 32
    assert accuracy == [2 / 3] * 32  # segments 0 (1 example, wrong) and 1 (2 examples, right)
    assert binned(per_segment[:4], bins=32)[2] == [0.0, 1.0, 0.0, 1.0]  # few segments: unbinned


def test_null_weight_is_what_the_memories_leave_including_the_in_window_segment():
    torch.manual_seed(0)
    plain = row(4, 1, True, 0)  # the needle in the last segment: no memory of it to weigh
    nulled = dict(row(4, 1, True, 1), last_recall=row(4, 1, True, 1)["last_recall"] * 0.25)
    result = summarise([plain, nulled, row(1, 1, True, 0)], keys=2)
    by_segment = {p["segment"]: p for p in result["per_segment"]}
    assert by_segment[4]["recall_weight"] is None
    assert abs(by_segment[4]["null_weight"] - (0 + 0.75) / 2) < 1e-6
    assert abs(result["null_weight_in_window"] - 0.75 / 2) < 1e-6
    assert abs(result["null_weight"] - 0.75 / 3) < 1e-6


def test_confident_reads_split_by_answer():
    torch.manual_seed(0)
    sharp = dict(row(4, 2, False, 0), last_recall=torch.tensor([0.0, 0.05, 0.9, 0.05]))  # wrong, one memory read
    flat = dict(row(4, 1, True, 1), last_recall=torch.full((4,), 0.25))  # right, an average of memories
    result = summarise([sharp, flat, row(1, 1, True, 0)], keys=2)
    assert result["confident_reads_wrong"] == 1 and result["confident_reads_right"] == 0
    assert abs(result["top_weight_wrong"] - 0.9) < 1e-6
    assert abs(result["top_weight_right"] - (0.25 + float(row(1, 1, True, 0)["last_recall"].max())) / 2) < 1e-6


def test_needles_in_an_unfinished_last_segment_leave_the_probe_out():
    rows = [dict(row(4, 1, True, i % 2), memories=torch.randn(4, 8)) for i in range(4)]  # no memory of segment 4
    assert summarise(rows, keys=2)["probe_needle_segment"] is None


def test_in_window_count_is_checked_first(capsys):
    from benchmarks.recall_diagnostics import main

    assert main(["--run-dir", "nowhere", "--backbone-cache", "nowhere", "--in-window", "-1"]) == 2
    assert "--in-window" in capsys.readouterr().err


def test_in_window_reads_are_kept_per_question_and_plotted(tmp_path):
    from benchmarks.recall_diagnostics import plot

    sharp = dict(row(4, 2, False, 0), last_recall=torch.tensor([0.0, 0.05, 0.9, 0.05]))  # wrong, confident
    declined = dict(row(4, 1, True, 1), last_recall=torch.tensor([0.1, 0.1, 0.05, 0.05]))  # right, slot took 0.7
    result = summarise([sharp, declined], keys=2)
    assert [r["correct"] for r in result["reads"]] == [False, True]
    assert abs(result["reads"][0]["top_weight"] - 0.9) < 1e-6 and result["reads"][0]["null_weight"] < 1e-6
    assert abs(result["reads"][1]["null_weight"] - 0.7) < 1e-6
    payload = {"corpus": "austen", "seed": 0, "length": 256, "in_window": 2, "without_null": False,
               "methods": {"hmt_write_init_null_decoy_spread_stable": result}}
    plot(payload, tmp_path / "diag.png")
    assert (tmp_path / "diag.png").stat().st_size > 1000
