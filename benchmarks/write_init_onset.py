"""When does HMT's memory start to work? Training-loss curves of one recipe with the write token started three ways.

    apt-get install -y python3-doc r-cran-janeaustenr   # the corpora (Debian), see benchmarks/lab/corpus.py
    PYTHONPATH=. python -m benchmarks.write_init_onset --corpus austen --seed 1 \\
        --backbone-cache benchmarks/output/backbones --steps 600

trains the long-context benchmark's recipe ``hmt_write_init_spread_stable`` (frozen backbone, learned write token,
facts spread over every segment with a quarter inside the last one, clipped gradients, cosine rate) on the same
backbone and the same episodes, once per ``--init-texts`` entry: ``default`` (the write token's usual random start),
and the write token started at the input embedding of the last token of each given text (`HMTConfig.
write_token_init_text`; ``" The secret word is"`` ends on the question's own last token, ``"."`` on a token
without the question's meaning). Every other parameter starts from the same draw. The answer-only loss is logged
every ``--log-every`` steps: a memory that has not started to work sits on the plateau of guessing among the keys
(~ln 30 = 3.4 at first, ~2.7 once the backbone's prior over keys is learned), and a working one falls below 1.

No evaluation is run (that is `benchmarks.long_context`); this measures only how soon learning starts, the
quantity that varied from under 200 steps to never across draws of the same backbone before the write token was
started from text. Writes ``write_init_onset.json`` and ``write_init_onset.png`` (one loss curve per start) to
``--output-dir`` (default benchmarks/output; ``--update-results``: benchmarks/results).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional


from benchmarks.lab import output as O
from benchmarks.lab import retrieval as R
from benchmarks.lab.pretrain import corpus_problem, prepare

METHOD = "hmt_write_init_spread_stable"
QUESTION_END = " The secret word is"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.write_init_onset", description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", default="austen", help="a corpus of benchmarks/lab/corpus.py")
    p.add_argument("--seed", type=int, default=1, help="the backbone's seed (and the adapter's)")
    p.add_argument("--backbone-cache", default=None, metavar="DIR",
                   help="reuse (or store) the pretrained backbone here, as benchmarks.long_context does")
    p.add_argument("--steps", type=int, default=600, help="training steps of each start (the recipe's schedule)")
    p.add_argument("--log-every", type=int, default=50, help="log the training loss every this many steps")
    p.add_argument("--init-texts", nargs="+", default=["default", QUESTION_END, "."],
                   help="'default' (random start) or a text whose last token starts the write token")
    p.add_argument("--threads", type=int, default=1)
    O.add_output_arguments(p)
    return p


def settings(args: argparse.Namespace) -> R.Settings:
    """The long-context benchmark's --quick settings at this corpus, seed and training length, with training rows of
    up to 8 segments (the --quick of the committed onset curves; --quick now trains on up to 16)."""
    return R.quick(corpus=args.corpus, seed=args.seed, hmt_steps=args.steps, threads=args.threads, methods=(METHOD,),
                   max_train_segments=8, backbone_cache=args.backbone_cache or "", hmt_logging_steps=args.log_every)


def run(args: argparse.Namespace, command: str, out_dir: Path) -> dict[str, Any]:
    start = time.perf_counter()
    log = O.logger(start)
    s = settings(args)
    prep = prepare(s, log)
    backbone, stream = prep.backbone, prep.train_stream.tolist()
    curves: dict[str, dict[str, Any]] = {}
    for text in args.init_texts:
        init = None if text == "default" else text
        began = time.perf_counter()
        model, losses, _ = R.train_method(METHOD, backbone, prep, stream, s, out_dir,
                                           overrides={"write_token_init_text": init},
                                           name=f"{METHOD}-init-{len(curves)}")
        steps = [args.log_every * (i + 1) for i in range(len(losses))]
        curves[text] = {"write_token_init_text": init, "steps": steps, "loss": losses,
                        "seconds": time.perf_counter() - began}
        log(f"start {text!r}: loss " + " ".join(f"{x:.2f}" for x in losses))
        backbone = model.unload()
    payload = {"command": command, "machine": O.machine_info("cpu"), "method": METHOD,
               "settings": asdict(s), "curves": curves, "seconds": time.perf_counter() - start}
    path = O.write_json(out_dir / "write_init_onset.json", payload)
    plot(payload, out_dir / "write_init_onset.png")
    log(f"wrote {path} and write_init_onset.png")
    return payload


def plot(payload: dict[str, Any], path: Path) -> None:
    plt = O.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for text, curve in payload["curves"].items():
        label = "random start (default)" if text == "default" else f"started at {text!r}"
        ax.plot(curve["steps"], curve["loss"], marker="o", ms=3, label=label)
    s = payload["settings"]
    ax.set_xlabel("training step")
    ax.set_ylabel("answer-only training loss")
    ax.set_title(f"{s['corpus']}, seed {s['seed']}: when the memory starts to work", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    O.save_figure(fig, path)


def main(argv: Optional[list[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    if args.steps < 1 or args.log_every < 1:
        print("write_init_onset: --steps and --log-every must be positive", file=sys.stderr)
        return 2
    problem = corpus_problem(settings(args))
    if problem:
        print(problem, file=sys.stderr)
        return 2
    O.quiet_torch_run(args.threads)
    run(args, O.quoted_command("PYTHONPATH=. python -m benchmarks.write_init_onset", argv), O.output_dir(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
