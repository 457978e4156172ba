"""The corpus helpers of benchmarks/quality.py on a synthetic directory (no Debian corpus, no training)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# loaded by path: benchmarks/ is not an installed package, and plain `pytest` does not put the repo root on sys.path
_SPEC = importlib.util.spec_from_file_location(
    "_quality_benchmark", Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py"
)
quality = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = quality  # dataclasses look their module up here
_SPEC.loader.exec_module(quality)


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
    assert quality.list_documents(str(tmp_path)) == names
    assert quality.list_documents(str(tmp_path / "absent")) == []


def test_split_is_a_deterministic_partition_by_path(tmp_path: Path) -> None:
    names = _write_corpus(tmp_path, count=200)
    train, heldout = quality.split_documents(names, 0.2)
    assert sorted(train + heldout) == names and not set(train) & set(heldout)
    assert 10 <= len(heldout) <= 70  # ~40 expected from a uniform hash
    # depends on the path only: same answer for any order or subset of the paths
    assert quality.split_documents(list(reversed(names)), 0.2)[1] == list(reversed(heldout))
    assert [p for p in names[:50] if quality.is_heldout(p, 0.2)] == [p for p in heldout if p in names[:50]]
    with pytest.raises(ValueError, match="heldout_fraction"):
        quality.split_documents(names, 1.0)


def test_eval_documents_filters_short_and_truncates_long() -> None:
    docs = [list(range(10)), list(range(40)), list(range(100)), list(range(17))]
    out = quality.eval_documents(docs, segment_length=8, min_segments=2, max_segments=3)
    assert out == [list(range(24)), list(range(24)), list(range(17))]
    assert quality.eval_documents(docs, 8, 2, 3, max_documents=1) == [list(range(24))]


def test_missing_corpus_names_the_install_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert quality.main(["--corpus-dir", str(tmp_path), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "apt-get install -y python3-doc" in err and str(tmp_path) in err
    assert "apt-get install -y python3-doc" in (quality.__doc__ or "")
