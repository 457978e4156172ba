"""Where a frozen backbone's memory path breaks: can it READ a memory at position 0, and can its write slot WRITE one?

    apt-get install -y python3-doc      # the corpus (Debian), as benchmarks/long_context.py
    PYTHONPATH=. python -m benchmarks.memory_probe            # ~4 min on one CPU core

The backbone is `benchmarks.long_context`'s (`--quick` settings, `benchmarks.lab.settings.quick_retrieval`: a small
Llama pretrained on 64-token windows of the Python documentation with in-window needle episodes, then frozen). Three probes on the needle task
("The secret word is KEY." ... "What is the secret word? The secret word is"), each trained with Adam on training
text and scored on held-out text (argmax over the 30 single-token keys, chance 1/30):

- ``read``: an oracle writer. One free vector per key is put at position 0 of the question's segment
  (``[v_KEY ; filler ; question]``, the needle nowhere): does the frozen backbone answer from position 0 alone?
- ``write_tied``: the paper's layout ``[m ; segment with the needle ; m]``: one learned vector ``m`` at position 0
  and at the write slot, and a linear probe on the write slot's last hidden state: does it hold the key?
- ``write_learned``: the same with a separate learned write token ``w`` (``[m ; segment ; w]``, HMT's
  ``write_token="learned"``).

Writes ``memory_probe.json`` (command, settings, accuracy curves) and ``memory_probe.png``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from benchmarks.lab import corpus as K
from benchmarks.lab import output as O
from benchmarks.lab.pretrain import Prepared, prepare
from benchmarks.lab.settings import RetrievalSettings, quick_retrieval

QUESTION = " What is the secret word? The secret word is"


def key_ids(prep: Prepared) -> list[int]:
    return [prep.tokenizer(" " + k, add_special_tokens=False).input_ids[0] for k in prep.vocab.keys]


def filler(stream, n: int, rng: random.Random) -> list[int]:
    start = rng.randrange(len(stream) - n - 1)
    return list(stream[start : start + n])


def question_batch(prep: Prepared, stream, width: int, rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, width - 1) filler ending with the question, and the key index of each row (the needle is NOT there)."""
    q = prep.tokenizer(QUESTION, add_special_tokens=False).input_ids
    rows = [filler(stream, width - 1 - len(q), rng) + q for _ in range(n)]
    return torch.tensor(rows), torch.tensor([rng.randrange(len(prep.vocab.keys)) for _ in range(n)])


def needle_batch(prep: Prepared, stream, width: int, rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, width) filler with the needle planted at a random place before its last 8 tokens, and the key index."""
    rows, keys = [], []
    for _ in range(n):
        k = rng.randrange(len(prep.vocab.keys))
        needle = prep.tokenizer(f" The secret word is {prep.vocab.keys[k]}.", add_special_tokens=False).input_ids
        text = filler(stream, width - len(needle), rng)
        cut = rng.randrange(0, len(text) - 8)
        rows.append(text[:cut] + needle + text[cut:])
        keys.append(k)
    return torch.tensor(rows), torch.tensor(keys)


def train_probe(name: str, params: list[torch.Tensor], scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                batch: Callable[[random.Random, Any, int], tuple[torch.Tensor, torch.Tensor]], train: list[int],
                heldout: list[int], steps: int, lr: float, every: int, log) -> list[dict[str, float]]:
    """Adam on ``params``; ``scores(inputs, keys)`` -> (n, num_keys) logits. Held-out accuracy every ``every`` steps."""
    optim = torch.optim.Adam(params, lr=lr)
    rng, curve = random.Random(f"{name}-train"), []
    for step in range(1, steps + 1):
        x, k = batch(rng, train, 16)
        loss = F.cross_entropy(scores(x, k), k)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                x, k = batch(random.Random(f"{name}-heldout"), heldout, 128)
                acc = (scores(x, k).argmax(-1) == k).float().mean().item()
            curve.append({"step": step, "loss": loss.item(), "accuracy": acc})
            log(f"{name} step {step}: loss {loss.item():.3f}, held-out accuracy {100 * acc:.0f}%")
    return curve


def run(s: RetrievalSettings, steps: int, log) -> dict[str, Any]:
    prep = prepare(s, log)
    train, heldout = prep.train_stream.tolist(), prep.heldout_stream
    model, keys = prep.backbone, key_ids(prep)
    emb = model.get_input_embeddings().weight  # (V, d), frozen
    d, width = emb.shape[1], s.segment_length
    mean = emb.mean(dim=0)
    torch.manual_seed(s.seed)
    curves: dict[str, list] = {}

    table = torch.nn.Parameter(mean + 0.02 * torch.randn(len(keys), d))  # one free memory vector per key

    def read_scores(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        embeds = torch.cat([table[k].unsqueeze(1), emb[x]], dim=1)  # (n, width, d): [v_KEY ; filler ; question]
        return model(inputs_embeds=embeds).logits[:, -1, keys]

    curves["read"] = train_probe("read", [table], read_scores,
                                 lambda r, st, n: question_batch(prep, st, width, r, n), train, heldout, steps, 3e-2,
                                 max(1, steps // 12), log)

    for name, tied in (("write_tied", True), ("write_learned", False)):
        m = torch.nn.Parameter(mean + 0.02 * torch.randn(d))
        w = m if tied else torch.nn.Parameter(mean + 0.02 * torch.randn(d))
        probe = torch.nn.Linear(d, len(keys))

        def write_scores(x: torch.Tensor, k: torch.Tensor, m=m, w=w, probe=probe) -> torch.Tensor:
            n = x.shape[0]
            embeds = torch.cat([m.expand(n, 1, d), emb[x], w.expand(n, 1, d)], dim=1)  # [m ; segment ; w]
            return probe(model.model(inputs_embeds=embeds).last_hidden_state[:, -1])

        params = [m, *([] if tied else [w]), *probe.parameters()]
        curves[name] = train_probe(name, params, write_scores,
                                   lambda r, st, n: needle_batch(prep, st, width, r, n), train, heldout, steps,
                                   1e-2, max(1, steps // 12), log)
    return {"chance": 1 / len(keys), "curves": curves, "pretraining": prep.pretraining}


def plot(payload: dict[str, Any], path) -> None:
    plt = O.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    labels = {"read": "read: free vector per key at position 0", "write_tied": "write, [m ; x ; m] (paper)",
              "write_learned": "write, [m ; x ; w] (learned w)"}
    for name, curve in payload["curves"].items():
        ax.plot([c["step"] for c in curve], [c["accuracy"] for c in curve], marker="o", label=labels[name])
    ax.axhline(payload["chance"], color="grey", ls="--", lw=1, label="chance")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("probe training steps")
    ax.set_ylabel("held-out key accuracy")
    ax.set_title("frozen backbone: reading vs writing a memory", fontsize=10)
    ax.legend(fontsize=7)
    O.save_figure(fig, path)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="Adam steps per probe")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--corpus-dir", default=K.CORPUS_DIR)
    p.add_argument("--seed", type=int, default=0)
    O.add_output_arguments(p)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    s = quick_retrieval(corpus_dir=args.corpus_dir, seed=args.seed, threads=args.threads)
    if not K.list_documents(s.corpus_dir):
        print(K.missing_corpus_message(s.corpus_dir), file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, args.threads))
    start = time.perf_counter()
    log = O.logger(start)
    result = run(s, args.steps, log)
    payload = {"command": O.command_line("benchmarks.memory_probe"), "machine": O.machine_info("cpu"),
               "settings": {"steps": args.steps, "backbone": {k: getattr(s, k) for k in
                            ("hidden_size", "num_layers", "num_heads", "segment_length", "vocab_size")}},
               **result, "seconds": time.perf_counter() - start}
    path = O.write_json(O.output_dir(args) / "memory_probe.json", payload)
    plot(payload, path.with_suffix(".png"))
    log(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
