"""Passkey prompt/completion rows for ``recipes/retrieval-tiny.yaml``, and the accuracy of an adapter trained on them.

    python recipes/data/passkey.py write                               # recipes/data/passkey_train.jsonl (shipped)
    python recipes/data/passkey.py accuracy outputs/retrieval-tiny     # adapter vs the backbone alone, by length

The task is the demo's (`hmt_adapter_cli.demo.PasskeyTask`, the tiny word-level tokenizer, no download): a prompt
of filler words holds one key word and ends with the query mark ``?``; the completion is the key. A row of ``k``
segments has ``k * segment_length - 2`` prompt tokens, so prompt + key + EOS fill exactly ``k`` segments.

Where the key goes is the data-side half of the recipe (what the long-context benchmark measured): in a uniformly
drawn segment, so the memory must learn to write every segment, not only the first; and in a quarter of the rows
(``--in-window-fraction``) inside the last segment, which the backbone reads itself, so the adapter learns not to
break what the backbone already answers; half of those rows (``--decoy-fraction``) also hold another key beyond the
window, so the adapter learns that a memory naming a candidate must not outvote the key the backbone sees (trained
without them, the adapter answers 62-72% of such held-out rows where the backbone alone answers 100%). Elsewhere the
key stays out of the last segment and of the sensory tokens carried into it: only the memory can bring it to the query.

``accuracy`` scores held-out rows (their own seed) at 1, 2, 4 and 8 windows (and 16, beyond the longest training
row): the share whose completion is the argmax at the query mark, for the backbone alone reading the last window of
the prompt and for backbone + adapter reading all of it; at 8 windows also with the key inside the last segment,
without and with a decoy key beyond the window, and with the query mark 1-8 tokens past the 8th segment's border
(``--border-fraction`` writes training rows like those; the shipped rows have none).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
TRAIN_FILE = HERE / "passkey_train.jsonl"
SEGMENT_LENGTH, NUM_SENSORY, NUM_KEYS = 16, 4, 16  # the demo's backbone window, and the recipe's num_sensory


def _beyond_window(segments: int, rng: random.Random) -> int:
    """A position in a uniformly drawn segment before the last, out of the sensory tokens carried into the last."""
    last = (segments - 1) * SEGMENT_LENGTH
    segment = rng.randrange(segments - 1)
    end = min((segment + 1) * SEGMENT_LENGTH, last - NUM_SENSORY)
    return rng.randrange(segment * SEGMENT_LENGTH, end)


def passkey_row(task: Any, words: list[str], segments: int, in_last: bool, rng: random.Random,
                decoy: bool = False, border: int = 0) -> dict[str, str]:
    """One row of ``segments`` segments, the key inside the window (``in_last``: the last segment, or with
    ``border`` the last ``SEGMENT_LENGTH`` prompt tokens) or in an earlier segment; with ``decoy`` (``in_last`` rows
    of 2+ segments) another key word sits beyond the window too, and the completion is the key in the window.

    ``border`` (1..8) makes the prompt ``segments`` whole segments and ``border`` tokens more, so the query mark is
    among the next segment's first 8 tokens and a key in the window mostly lies behind that border, where HMT reads
    it only through its sensory tokens and recall (the case a question ending just past a border is)."""
    if decoy and not (in_last and segments >= 2):
        raise ValueError(f"A decoy goes beyond the window of a row whose key is in its last segment; got "
                         f"segments={segments}, in_last={in_last}.")
    if not 0 <= border <= 8:
        raise ValueError(f"border is the number of prompt tokens past the last whole segment, 0..8; got {border}.")
    if border:
        length = segments * SEGMENT_LENGTH + border  # prompt tokens; the query mark is the next segment's border-th
        first_in_window = length - SEGMENT_LENGTH
    else:
        length = segments * SEGMENT_LENGTH - 2  # prompt tokens: prompt + key + EOS fill exactly the segments
        first_in_window = (segments - 1) * SEGMENT_LENGTH  # the last segment's first position
    position = rng.randrange(first_in_window, length - 1) if in_last else _beyond_window(segments, rng)
    ids, key = task.example(length + 1, position, rng)  # filler ... ? key
    if decoy:
        ids[_beyond_window(segments, rng)] = rng.choice([k for k in task.key_ids if k != key])
    return {"prompt": " ".join(words[i] for i in ids[:-1]), "completion": " " + words[key]}


def _task():
    from hmt_adapter.testing import tiny_tokenizer
    from hmt_adapter_cli.demo import PasskeyTask

    tokenizer = tiny_tokenizer()
    words = [w for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    return tokenizer, PasskeyTask.from_tokenizer(tokenizer, NUM_KEYS), words


def training_rows(count: int, max_segments: int, in_window_fraction: float, seed: int,
                  decoy_fraction: float = 0.0, border_fraction: float = 0.0) -> list[dict[str, str]]:
    """``count`` rows of 2..``max_segments`` segments (uniformly), a share with the key in the last segment, a
    share ``decoy_fraction`` of those with a decoy key beyond the window, and a share ``border_fraction`` of all
    rows (3 segments or more) ending the prompt 1-8 tokens past one segment fewer (``passkey_row``'s ``border``)."""
    _, task, words = _task()
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        segments, in_last = rng.randint(2, max_segments), rng.random() < in_window_fraction
        decoy = in_last and decoy_fraction > 0 and rng.random() < decoy_fraction
        border = 0
        if border_fraction > 0 and segments >= 3 and rng.random() < border_fraction:
            segments, border = segments - 1, rng.randint(1, 8)
        rows.append(passkey_row(task, words, segments, in_last, rng, decoy=decoy, border=border))
    return rows


def write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def eval_sets(examples: int, seed: int) -> dict[str, list[dict[str, str]]]:
    """Held-out rows per context: ``"8x"`` has the key beyond the last segment, ``"8x last"`` inside it, and
    ``"8x last, decoy"`` inside it with another key beyond the window (the answer is still the key in the window);
    the ``"border"`` sets end the prompt 1-8 tokens past the 8th segment (``passkey_row``'s ``border``)."""
    _, task, words = _task()
    rng = random.Random(seed)
    sets = {"1x": [passkey_row(task, words, 1, True, rng) for _ in range(examples)]}
    for multiple in (2, 4, 8, 16):
        sets[f"{multiple}x"] = [passkey_row(task, words, multiple, False, rng) for _ in range(examples)]
    sets["8x last"] = [passkey_row(task, words, 8, True, rng) for _ in range(examples)]
    sets["8x last, decoy"] = [passkey_row(task, words, 8, True, rng, decoy=True) for _ in range(examples)]
    sets["8x border"] = [passkey_row(task, words, 8, False, rng, border=rng.randint(1, 8)) for _ in range(examples)]
    sets["8x last, border"] = [passkey_row(task, words, 8, True, rng, border=rng.randint(1, 8))
                               for _ in range(examples)]
    return sets


def answer_accuracy(model: Any, tokenizer: Any, rows: list[dict[str, str]], window: Optional[int] = None,
                    batch: int = 64) -> float:
    """Share of rows whose completion's first token is the argmax after the prompt (the last ``window`` prompt
    tokens only, when given); rows are batched by prompt length."""
    import torch

    by_length: dict[int, list[tuple[list[int], int]]] = {}
    for r in rows:
        ids = tokenizer(r["prompt"], add_special_tokens=False).input_ids
        target = tokenizer(r["completion"], add_special_tokens=False).input_ids[0]
        by_length.setdefault(len(ids), []).append((ids[-window:] if window is not None else ids, target))
    right = 0
    with torch.no_grad():
        for group in by_length.values():
            for i in range(0, len(group), batch):
                chunk = group[i : i + batch]
                ids = torch.tensor([ids for ids, _ in chunk])
                predicted = model(input_ids=ids, logits_to_keep=1).logits[:, -1].argmax(-1)
                right += int((predicted == torch.tensor([t for _, t in chunk])).sum())
    return right / len(rows)


def accuracy(adapter: str, backbone: Optional[str], examples: int, seed: int) -> dict[str, dict[str, float]]:
    """{context: {"backbone": accuracy of the backbone on its last window, "hmt": with the adapter}}."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    backbone = backbone or PeftConfig.from_pretrained(adapter).base_model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(backbone, dtype=torch.float32), adapter)
    model.eval()
    window = model.peft_config[model.active_adapter].segment_length
    out = {}
    for name, rows in eval_sets(examples, seed).items():
        with model.disable_adapter():
            alone = answer_accuracy(model, tokenizer, rows, window)
        out[name] = {"backbone": alone, "hmt": answer_accuracy(model, tokenizer, rows)}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python recipes/data/passkey.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the training rows")
    w.add_argument("--output", type=Path, default=TRAIN_FILE)
    w.add_argument("--rows", type=int, default=1200)
    w.add_argument("--max-segments", type=int, default=8)
    w.add_argument("--in-window-fraction", type=float, default=0.25)
    w.add_argument("--decoy-fraction", type=float, default=0.5,
                   help="share of the in-window rows with a decoy key beyond the window")
    w.add_argument("--border-fraction", type=float, default=0.0,
                   help="share of rows (3 segments or more) ending the prompt 1-8 tokens past a segment border")
    w.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("accuracy", help="score a trained adapter against the backbone alone")
    a.add_argument("adapter")
    a.add_argument("--backbone", default=None, help="default: the adapter's base model path")
    a.add_argument("--examples", type=int, default=256)
    a.add_argument("--seed", type=int, default=1000)
    a.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from hmt_adapter_cli.quiet import no_progress_bars, silence_third_party_notices

    silence_third_party_notices()  # before peft is imported: the same two third-party notices the CLI drops
    if args.command == "write":
        write(args.output, training_rows(args.rows, args.max_segments, args.in_window_fraction, args.seed,
                                         args.decoy_fraction, args.border_fraction))
        print(f"wrote {args.rows} rows to {args.output}")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    with no_progress_bars():
        result = accuracy(args.adapter, args.backbone, args.examples, args.seed)
    print(f"passkey accuracy, {args.examples} held-out rows each (chance {100 / NUM_KEYS:.2f}%)")
    print(f"{'context':>56} | {'backbone alone':>14} | {'backbone + HMT':>14}")
    for name, r in result.items():
        multiple = int(name.split("x")[0])
        where = "key in the window" if multiple == 1 or "last" in name else "key beyond the window"
        where += ", a decoy beyond" if "decoy" in name else ""
        where += ", query past a border" if "border" in name else ""
        label = f"{multiple * SEGMENT_LENGTH} tokens ({multiple}x), {where}"
        print(f"{label:>56} | {100 * r['backbone']:13.1f}% | {100 * r['hmt']:13.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
