"""Real-prose corpora for the benchmarks, each shipped by a Debian package (no download at run time).

| name | what | install | documents |
|---|---|---|---|
| ``python-docs`` | the Python 3.11 documentation's reStructuredText sources | ``apt-get install -y python3-doc`` | one per ``*.rst.txt`` file |
| ``austen`` | Jane Austen's six novels (R package janeaustenr, Project Gutenberg text) | ``apt-get install -y r-cran-janeaustenr`` | one per chapter |

``austen`` is read straight from the R package's lazy-load database (``data/Rdata.rdb``: one zlib-compressed R
serialization per novel, a character vector of lines); R itself is not needed, and ``--no-install-recommends``
skips R's own dependencies when only the data are wanted. The two corpora differ in every way that matters to a
retrieval benchmark: technical reference prose with code vs 19th-century narrative and dialogue.

A corpus is a list of ``(document id, text)`` pairs sorted by id; `split` puts each id in the training or held-out
part by a hash of the id, so the split never changes between runs or machines.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from benchmarks import quality as Q


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
    paths = Q.list_documents(root)
    return list(zip(paths, Q.read_documents(root, paths)))


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
    "python-docs": Corpus("python-docs", Q.CORPUS_DIR, Q.INSTALL_COMMAND, _read_rst_dir),
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
        return Corpus(Path(name).name, name, f"(a directory of *{Q.SUFFIX} files)", _read_rst_dir)
    raise ValueError(f"Unknown corpus {name!r}: use one of {sorted(CORPORA)} or a directory of *{Q.SUFFIX} files.")


def split(docs: Sequence[tuple[str, str]], heldout_fraction: float = 0.15) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) by `quality.is_heldout` on each document's id."""
    train = [text for doc_id, text in docs if not Q.is_heldout(doc_id, heldout_fraction)]
    heldout = [text for doc_id, text in docs if Q.is_heldout(doc_id, heldout_fraction)]
    return train, heldout
