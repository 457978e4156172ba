"""Real-prose corpora for the benchmarks, each shipped by a Debian package (no download at run time).

| name | what | install | documents |
|---|---|---|---|
| ``python-docs`` | the Python 3.11 documentation's reStructuredText sources | ``apt-get install -y python3-doc`` | one per ``*.rst.txt`` file |
| ``austen`` | Jane Austen's six novels (R package janeaustenr, Project Gutenberg text) | ``apt-get install -y r-cran-janeaustenr`` | one per chapter |

``python-docs`` comes from Debian's ``python3.11-doc`` package (pulled in by ``python3-doc``), under
``/usr/share/doc/python3.11/html/_sources/`` as ``*.rst.txt`` files. ``austen`` is read straight from the R package's
lazy-load database (``data/Rdata.rdb``: one zlib-compressed R serialization per novel, a character vector of lines); R
itself is not needed, and ``--no-install-recommends`` skips R's own dependencies when only the data are wanted. The two
corpora differ in every way that matters to a retrieval benchmark: technical reference prose with code vs
19th-century narrative and dialogue.

A document is identified by its path (or id); a deterministic hash (SHA-256) of it puts it in the training or the
held-out split (`is_heldout`), so the split never changes between runs or machines. A corpus is a list of
``(document id, text)`` pairs sorted by id (`Corpus.documents`); `split` cuts it the same way.

`TINY_TEXT` is a few hundred words of local text for tests that need a tokenizer and a token stream without a corpus.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

CORPUS_DIR = "/usr/share/doc/python3.11/html/_sources"
INSTALL_COMMAND = "apt-get install -y python3-doc"
SUFFIX = ".rst.txt"

#: A stand-in corpus for tests: Python-docs-like prose, repeated (no package needed).
TINY_TEXT = (
    "The interpreter reads a module, compiles it to bytecode and runs it. Functions are objects; a class "
    "defines attributes and methods. The standard library offers modules for files, text, numbers and time. "
) * 40


# ---- a directory of *.rst.txt documents (python-docs) -------------------------------------------------------------------
def missing_corpus_message(corpus_dir: str) -> str:
    return (
        f"The corpus directory {corpus_dir!r} has no *{SUFFIX} files. It comes from Debian's python3.11-doc "
        f"package; install it with:\n\n    {INSTALL_COMMAND}\n\n(or pass --corpus-dir pointing at a directory of "
        f"*{SUFFIX} files)."
    )


def list_documents(root: str, suffix: str = SUFFIX) -> list[str]:
    """Paths (relative to ``root``, '/'-separated, sorted) of every ``*suffix`` file under ``root``."""
    base = Path(root)
    if not base.is_dir():
        return []
    return sorted(p.relative_to(base).as_posix() for p in base.rglob(f"*{suffix}") if p.is_file())


def read_documents(root: str, paths: Sequence[str]) -> list[str]:
    return [(Path(root) / p).read_text(encoding="utf-8", errors="replace") for p in paths]


# ---- splits -------------------------------------------------------------------------------------------------------------
def is_heldout(relative_path: str, heldout_fraction: float) -> bool:
    """Deterministic split: the first 8 bytes of SHA-256(path) as a number in [0, 1) below the fraction."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def split_documents(paths: Sequence[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """(training paths, held-out paths), each in the order of ``paths``."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}.")
    train = [p for p in paths if not is_heldout(p, heldout_fraction)]
    heldout = [p for p in paths if is_heldout(p, heldout_fraction)]
    return train, heldout


def split_validation(train_paths: Sequence[str], validation_fraction: float) -> tuple[list[str], list[str]]:
    """(pretraining paths, validation paths) of the training split, by a second hash of the path (salted, so it is
    independent of the held-out split). The validation documents only decide when pretraining stops."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    val = [p for p in train_paths if is_heldout("validation:" + p, validation_fraction)]
    chosen = set(val)
    return [p for p in train_paths if p not in chosen], val


def split(docs: Sequence[tuple[str, str]], heldout_fraction: float = 0.15) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) by `is_heldout` on each document's id."""
    train = [text for doc_id, text in docs if not is_heldout(doc_id, heldout_fraction)]
    heldout = [text for doc_id, text in docs if is_heldout(doc_id, heldout_fraction)]
    return train, heldout


def eval_documents(token_docs: Sequence[Sequence[int]], segment_length: int, min_segments: int,
                   max_segments: int, max_documents: int = 0) -> list[list[int]]:
    """Held-out documents to score: those of at least ``min_segments`` full segments, each cut to its first
    ``max_segments * segment_length`` tokens, at most ``max_documents`` of them (0: all), in the given order."""
    out = []
    for doc in token_docs:
        if len(doc) < min_segments * segment_length:
            continue
        out.append(list(doc[: max_segments * segment_length]))
        if max_documents and len(out) == max_documents:
            break
    return out


# ---- named corpora ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    """A named corpus: where its files are, the command that installs them, and how to read its documents."""

    name: str
    root: str
    install: str
    read: Callable[[str], list[tuple[str, str]]]

    def documents(self) -> list[tuple[str, str]]:
        """``(id, text)`` of every document, sorted by id; empty when the corpus is not installed."""
        return self.read(self.root) if Path(self.root).exists() else []

    def missing_message(self) -> str:
        return (f"The corpus {self.name!r} is not installed (nothing under {self.root}). Install it with:\n\n"
                f"    {self.install}\n")


def _read_rst_dir(root: str) -> list[tuple[str, str]]:
    paths = list_documents(root)
    return list(zip(paths, read_documents(root, paths)))


def _r_strings(blob: bytes) -> list[str]:
    """The elements of the character vector serialized in ``blob`` (R's XDR serialization, version 2 or 3)."""
    if blob[:2] != b"X\n":
        raise ValueError("not an XDR R serialization")
    pos = 2
    version, = struct.unpack_from(">i", blob, pos)
    pos += 12  # format version, writer's R version, minimal R version
    if version == 3:
        n, = struct.unpack_from(">i", blob, pos)
        pos += 4 + n  # native encoding name
    flags, length = struct.unpack_from(">ii", blob, pos)
    pos += 8
    if flags & 0xFF != 16:  # STRSXP
        raise ValueError(f"expected a character vector, got SEXP type {flags & 0xFF}")
    out = []
    for _ in range(length):
        _, n = struct.unpack_from(">ii", blob, pos)  # CHARSXP flags, byte length (-1: NA)
        pos += 8
        if n < 0:
            out.append("")
            continue
        out.append(blob[pos : pos + n].decode("utf-8", errors="replace"))
        pos += n
    return out


_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+[0-9IVXLC]+\b")


def _read_austen(root: str) -> list[tuple[str, str]]:
    """Each chapter of each novel as one document (id ``novel-index/chapter-index``)."""
    rdb = (Path(root) / "data" / "Rdata.rdb").read_bytes()
    docs, pos, novel = [], 0, 0
    while pos < len(rdb):
        inflate = zlib.decompressobj()
        blob = inflate.decompress(rdb[pos + 4 :])  # 4-byte length, then one zlib stream per object
        pos = len(rdb) - len(inflate.unused_data)
        lines = _r_strings(blob)
        chapters: list[list[str]] = [[]]
        for line in lines:
            if _CHAPTER.match(line):
                chapters.append([])
            chapters[-1].append(line)
        for i, chapter in enumerate(chapters[1:]):  # chapters[0] is the title page
            text = re.sub(r"\n{3,}", "\n\n", "\n".join(chapter)).strip()
            docs.append((f"novel{novel}/chapter{i:03d}", text))
        novel += 1
    return sorted(docs)


CORPORA = {
    "python-docs": Corpus("python-docs", CORPUS_DIR, INSTALL_COMMAND, _read_rst_dir),
    "austen": Corpus("austen", "/usr/lib/R/site-library/janeaustenr",
                     "apt-get install -y --no-install-recommends r-cran-janeaustenr", _read_austen),
}


def get(name: str, root: str | None = None) -> Corpus:
    """The corpus called ``name`` (optionally read from another ``root``; ``name`` may also be a directory of
    ``*.rst.txt`` files)."""
    if name in CORPORA:
        corpus = CORPORA[name]
        return corpus if root is None else Corpus(corpus.name, root, corpus.install, corpus.read)
    if Path(name).is_dir():
        return Corpus(Path(name).name, name, f"(a directory of *{SUFFIX} files)", _read_rst_dir)
    raise ValueError(f"Unknown corpus {name!r}: use one of {sorted(CORPORA)} or a directory of *{SUFFIX} files.")
