"""A finished long-context run as the analysis scripts read it (`benchmarks.long_context --compare`,
`benchmarks.question_border`): its ``long_context.json`` and the result rows of one method."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def read_run(path: str, option: str = "") -> dict[str, Any]:
    """The payload of a run's ``long_context.json`` at ``path``; ValueError (prefixed by the command-line
    ``option`` that named it) for a missing file or one that is not JSON."""
    where = f"{option} {path}" if option else path
    if not Path(path).is_file():
        raise ValueError(f"{where}: no such file; pass runs' long_context.json.")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a long_context.json ({e}).") from None


#: The pseudo-method of a run's backbone answering with the evidence inside its window (the ``backbone_in_window``
#: rows of its ``long_context.json``): two backbones compared on the same in-window questions.
BACKBONE_IN_WINDOW = "backbone_in_window"


def method_rows(payload: dict[str, Any], path: str, method: Optional[str]) -> tuple[str, list[dict[str, Any]]]:
    """The rows of one method of a run's ``long_context.json``: ``method``, or the run's only method other than the
    sliding window; `BACKBONE_IN_WINDOW`: its backbone's in-window rows. Raises ValueError when that is missing or
    ambiguous."""
    if method == BACKBONE_IN_WINDOW:
        if not payload.get(BACKBONE_IN_WINDOW):
            raise ValueError(f"{path} has no {BACKBONE_IN_WINDOW} rows.")
        return method, payload[BACKBONE_IN_WINDOW]
    methods = list(dict.fromkeys(r["method"] for r in payload.get("results", [])))
    if method is None:
        candidates = [m for m in methods if m != "sliding_window"] or methods
        if len(candidates) != 1:
            raise ValueError(f"{path} holds {len(candidates)} methods ({', '.join(candidates) or 'none'}); name the "
                             "one with --methods.")
        method = candidates[0]
    elif method not in methods:
        raise ValueError(f"{path} has no rows of {method!r} (it has {', '.join(methods) or 'none'}).")
    rows = [r for r in payload["results"] if r["method"] == method]
    cells = [(r["task"], r["context_tokens"], r["depth"]) for r in rows]
    if len(set(cells)) < len(cells):  # a --combine result: several corpora or seeds share every cell
        raise ValueError(f"{path} holds several runs of {method!r} (a --combine result?); pass one run's "
                         "long_context.json.")
    return method, rows
