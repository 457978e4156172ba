"""Inference benchmark (issue 3): streaming ingestion vs full attention, and HMT decoding vs the bare backbone.

    python -m benchmarks.ingestion                 # full run (~10-15 min on 2 CPU cores)
    python -m benchmarks.ingestion --quick         # smoke run (4k and 16k only)

Model: a randomly initialised Llama, hidden 256, 4 layers, 4 heads (4 KV heads), MLP 688, vocab 1024, float32,
sdpa attention; HMT: segment_length 256, num_sensory 32, recall_window 300, recall_dim 256, recall_query "segment".

* Ingestion: each input length runs in a FRESH subprocess (so ru_maxrss is that run's peak RSS): random tokens fed
  to `HMTStreamer.feed` in chunks of 4096 without logits (``return_logits=False``), then ``finish``.
* Full attention: the same backbone weights with max_position_embeddings raised to the input length, one forward of
  the decoder stack over the whole input (no logits, no KV cache), for lengths up to ``--full-max``.
* Decoding: greedy, batch 1, prompt 128 tokens, 256 new tokens (HMT rolls over once, at 256 tokens); the bare
  backbone's ``generate`` over the same prompt and new tokens (a 384-token window), best of 2 runs.

Writes ingestion.json and ingestion.png to --output-dir (default benchmarks/output; --update-results:
benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
import warnings

import torch

from benchmarks.lab import measure as M
from benchmarks.lab import output as O
from benchmarks.lab.backbone import INFERENCE_HMT as HMT
from benchmarks.lab.backbone import INFERENCE_MODEL as MODEL
from benchmarks.lab.backbone import inference_model as build
from hmt_adapter.inference.streaming import HMTStreamer

CHUNK = 4096


def run_one(kind: str, length: int) -> dict:
    """One measurement in this (fresh) process; returns tokens/s and peak RSS."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    ids = torch.randint(4, MODEL["vocab_size"], (1, length))
    if kind == "hmt":
        streamer = HMTStreamer(build())
        start = time.perf_counter()
        state = streamer.init_state(1)
        for pos in range(0, length, CHUNK):
            _, state = streamer.feed(ids[:, pos : pos + CHUNK], state, return_logits=False)
        streamer.finish(state, return_logits=False)
        elapsed = time.perf_counter() - start
    elif kind == "full":
        model = build(max_positions=max(length, 512), with_hmt=False)
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
            start = time.perf_counter()
            model.base_model(inputs_embeds=embeds, use_cache=False)
            elapsed = time.perf_counter() - start
    else:
        raise ValueError(kind)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, "tokens": length, "seconds": elapsed, "tokens_per_s": length / elapsed,
            "peak_rss_mib": peak_kib / 1024}


def decode_bench(prompt_len: int = 128, new: int = 256, repeats: int = 2) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    ids = torch.randint(4, MODEL["vocab_size"], (1, prompt_len))
    hmt = build()
    bare = build(with_hmt=False)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = {}
    for name, model in (("hmt", hmt), ("backbone", bare)):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.no_grad():
                seq = model.generate(input_ids=ids, **kw)
            best = min(best, time.perf_counter() - start)
        assert seq.shape[1] == prompt_len + new
        out[name] = {"seconds": best, "new_tokens_per_s": new / best}
    out["ratio_hmt_over_backbone"] = out["hmt"]["new_tokens_per_s"] / out["backbone"]["new_tokens_per_s"]
    out.update(prompt_tokens=prompt_len, new_tokens=new, batch_size=1)
    return out


#: glibc's dynamic mmap threshold keeps freed large buffers resident, so RSS would also count retained free heap
#: (see benchmarks/lab/measure.py); a fixed threshold makes peak RSS track live memory. --stock-malloc turns it off.
CHILD_ENV: dict = dict(M.FIXED_MMAP_THRESHOLD)


def subprocess_json(*args: str) -> dict:
    return M.run_worker("benchmarks.ingestion", list(args), extra_env=dict(CHILD_ENV, PYTHONWARNINGS="ignore"))


def crossover(hmt: list[dict], full: list[dict]) -> dict:
    """Smallest length where HMT ingestion is faster than full attention (log-log interpolation of full's curve)."""
    rate = sum(r["tokens_per_s"] for r in hmt) / len(hmt)  # HMT's rate is flat in length
    pts = sorted((r["tokens"], r["tokens_per_s"]) for r in full)
    for (l0, r0), (l1, r1) in zip(pts, pts[1:]):
        if r0 >= rate > r1:
            f = (math.log(r0) - math.log(rate)) / (math.log(r0) - math.log(r1))
            return {"tokens": round(math.exp(math.log(l0) + f * (math.log(l1) - math.log(l0)))), "hmt_tokens_per_s": rate}
    if pts and pts[0][1] < rate:
        return {"tokens": f"< {pts[0][0]}", "hmt_tokens_per_s": rate}
    return {"tokens": f"> {pts[-1][0]} (not reached in the measured range)", "hmt_tokens_per_s": rate}


def plot(result: dict, path: str) -> None:
    plt = O.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, label in (("hmt", "HMT streaming"), ("full", "full attention")):
        rows = result["ingestion"][kind]
        a.plot([r["tokens"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", label=label)
        b.plot([r["tokens"] for r in rows], [r["peak_rss_mib"] for r in rows], "o-", label=label)
    for ax, ylabel in ((a, "tokens / s"), (b, "peak RSS (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input tokens")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
    a.set_yscale("log")
    dec = result["decoding"]
    fig.suptitle(f"tiny Llama h256 l4; decoding: HMT {dec['hmt']['new_tokens_per_s']:.0f} vs backbone "
                 f"{dec['backbone']['new_tokens_per_s']:.0f} new tok/s ({dec['ratio_hmt_over_backbone']:.2f}x)")
    O.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "LENGTH"), help=argparse.SUPPRESS)
    parser.add_argument("--child-decode", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", default="4096,16384,65536,262144")
    parser.add_argument("--full-lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--quick", action="store_true", help="4k and 16k only, full attention up to 4k")
    parser.add_argument("--tag", default="ingestion")
    parser.add_argument("--stock-malloc", action="store_true", help="measure with glibc's default mmap threshold")
    O.add_output_arguments(parser)
    args = parser.parse_args()
    if args.stock_malloc:
        CHILD_ENV.clear()
    warnings.filterwarnings("ignore")
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]))))
        return
    if args.child_decode:
        print(json.dumps(decode_bench()))
        return
    lengths = [4096, 16384] if args.quick else [int(x) for x in args.lengths.split(",")]
    full_lengths = [1024, 2048, 4096] if args.quick else [int(x) for x in args.full_lengths.split(",")]
    result = {"model": MODEL, "hmt": HMT, "chunk": CHUNK, "threads": int(os.environ.get("BENCH_THREADS", "2")),
              "malloc_env": dict(CHILD_ENV), "command": "python -m benchmarks.ingestion " + " ".join(sys.argv[1:]),
              "ingestion": {"hmt": [], "full": []}}
    out_dir = O.output_dir(args)
    partial = out_dir / f"{args.tag}.partial.json"
    for kind, todo in (("hmt", lengths), ("full", full_lengths)):
        for n in todo:
            result["ingestion"][kind].append(subprocess_json("--child", kind, str(n)))
            print(kind, result["ingestion"][kind][-1], flush=True)
            with open(partial, "w") as f:  # so an interrupted run still leaves its measurements
                json.dump(result, f, indent=2)
    hmt_rows = result["ingestion"]["hmt"]
    result["rss_ratio_longest_over_shortest"] = hmt_rows[-1]["peak_rss_mib"] / hmt_rows[0]["peak_rss_mib"]
    result["crossover"] = crossover(hmt_rows, result["ingestion"]["full"])
    result["decoding"] = subprocess_json("--child-decode")
    print("decoding", result["decoding"], flush=True)
    os.remove(partial)
    O.write_json(out_dir / f"{args.tag}.json", result)
    plot(result, out_dir / f"{args.tag}.png")
    print(json.dumps({k: result[k] for k in ("rss_ratio_longest_over_shortest", "crossover")}))


if __name__ == "__main__":
    main()
