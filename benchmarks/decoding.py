"""Decoding benchmark (issue 10, part 3): a ragged batch vs one prompt at a time, and prefill vs the forward.

    PYTHONPATH=. python -m benchmarks.decoding                  # ~5 min on one CPU thread
    PYTHONPATH=. python -m benchmarks.decoding --quick          # smoke run (fewer repeats, 4k prompt)

Model: the tiny random Llama of benchmarks/ingestion.py (`benchmarks.lab.backbone.inference_model`: hidden 256, 4 layers, vocab 1024, float32, sdpa); HMT:
segment_length 256, num_sensory 32, recall_window 300, recall_dim 256, recall_query "segment".

* Ragged batch: 4 prompts of different lengths (``--prompt-lengths``, at different positions in their segments),
  left-padded into one batch, greedy ``generate`` of ``--new-tokens`` tokens (rows roll over to a new segment at
  different steps) vs the same 4 prompts generated one at a time. Decode time = median time with N new tokens minus
  median time with 1 new token (the prompt alone), so the prompts' prefill is not counted; new tokens/s counts
  every row's new tokens after the first.
* Ceiling: the bare decoder's one cached step over 4 rows in one call vs 4 one-row calls (what batching alone
  can give on this machine, the ragged batch's upper bound).
* Prefill: ``generate(max_new_tokens=1)`` on a ``--long-prompt``-token prompt vs the forward
  ``model(input_ids, logits_to_keep=1)`` on the same tokens (both under no_grad): tokens/s of each.

All timings are interleaved (A B C A B C ...) and medians of ``--repeats`` rounds. Writes decoding.json (with the
command, machine and /proc/loadavg before and after) and decoding.png to --output-dir.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

from benchmarks.lab import measure as M
from benchmarks.lab import output as O
from benchmarks.lab.backbone import INFERENCE_HMT as HMT
from benchmarks.lab.backbone import INFERENCE_MODEL as MODEL
from benchmarks.lab.backbone import inference_model as build


def left_padded(prompts):
    width = max(p.numel() for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - p.numel() :], mask[i, width - p.numel() :] = p, 1
    return batch, mask


def ragged_batch(model, lengths: list[int], new: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, MODEL["vocab_size"], (n,), generator=gen) for n in lengths]
    batch, mask = left_padded(prompts)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def batched(n: int):
        return lambda: model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw)

    def sequential(n: int):
        return lambda: [model.generate(input_ids=p.unsqueeze(0), max_new_tokens=n, min_new_tokens=n, **kw)
                        for p in prompts]

    with torch.no_grad():
        together = batched(new)()
        alone = sequential(new)()
        same = all(torch.equal(together[i, batch.shape[1] - p.numel() :], a[0]) for i, (p, a) in enumerate(zip(prompts, alone)))
        times = M.time_interleaved({"batch_N": batched(new), "batch_1": batched(1), "seq_N": sequential(new),
                                    "seq_1": sequential(1)}, repeats=repeats)
    decoded = len(lengths) * (new - 1)
    batch_s = times["batch_N"]["median_s"] - times["batch_1"]["median_s"]
    seq_s = times["seq_N"]["median_s"] - times["seq_1"]["median_s"]
    return {
        "prompt_lengths": lengths, "new_tokens": new, "outputs_equal_each_prompt_alone": bool(same),
        "batch": {"decode_s": batch_s, "new_tokens_per_s": decoded / batch_s, "ms_per_step": 1000 * batch_s / (new - 1)},
        "sequential": {"decode_s": seq_s, "new_tokens_per_s": decoded / seq_s},
        "speedup_batch_over_sequential": seq_s / batch_s,
        "timings": times,
    }


def ceiling(model, rows: int, width: int = 300, repeats: int = 5) -> dict:
    """What batching can give on this machine: the bare decoder stack + LM head, one cached token step over
    ``rows`` rows in one call vs ``rows`` one-row calls (KV cache of ``width`` slots, no HMT, no mask)."""
    decoder, head = model.get_base_model().base_model, model.get_output_embeddings()
    d = MODEL["hidden_size"]

    def step(b: int):
        kv = decoder(inputs_embeds=torch.randn(b, width, d), use_cache=True).past_key_values
        y, pos = torch.randn(b, 1, d), torch.full((b, 1), width)

        def run():
            for _ in range(rows // b):
                out = decoder(inputs_embeds=y, past_key_values=kv, use_cache=True, position_ids=pos)
                head(out.last_hidden_state)
                for layer in out.past_key_values.layers:  # back to ``width`` slots for the next round
                    layer.keys, layer.values = layer.keys[:, :, :width], layer.values[:, :, :width]
        return run

    with torch.no_grad():
        times = M.time_interleaved({"one_call": step(rows), "separate_calls": step(1)}, repeats=repeats)
    return {"rows": rows, "kv_slots": width, "timings": times,
            "speedup_one_call_over_separate": times["separate_calls"]["median_s"] / times["one_call"]["median_s"]}


def prefill(model, length: int, repeats: int) -> dict:
    ids = torch.randint(4, MODEL["vocab_size"], (1, length), generator=torch.Generator().manual_seed(1))

    def gen():
        return model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, eos_token_id=None, pad_token_id=0)

    def forward():
        return model(input_ids=ids, logits_to_keep=1)

    with torch.no_grad():
        first_gen = gen()[0, -1]
        first_fwd = forward().logits[0, -1].argmax()
        times = M.time_interleaved({"generate": gen, "forward": forward}, repeats=repeats)
    g, f = times["generate"]["median_s"], times["forward"]["median_s"]
    return {
        "prompt_tokens": length, "same_first_token": bool(first_gen == first_fwd),
        "generate": {"seconds": g, "tokens_per_s": length / g},
        "forward": {"seconds": f, "tokens_per_s": length / f},
        "generate_over_forward_throughput": f / g,
        "timings": times,
    }


def plot(result: dict, path: Path) -> None:
    plt = O.pyplot()
    rag, pre = result["ragged"], result["prefill"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(["one at a time", "ragged batch"], [rag["sequential"]["new_tokens_per_s"], rag["batch"]["new_tokens_per_s"]])
    a.set_ylabel("new tokens / s (all rows)")
    a.set_title(f"4 prompts {rag['prompt_lengths']}: {rag['speedup_batch_over_sequential']:.2f}x")
    b.bar(["forward", "generate (prefill)"], [pre["forward"]["tokens_per_s"], pre["generate"]["tokens_per_s"]])
    b.set_ylabel("prompt tokens / s")
    b.set_title(f"{pre['prompt_tokens']}-token prompt: {pre['generate_over_forward_throughput']:.2f}x of forward")
    for ax in (a, b):
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"tiny Llama h256 l4, segment 256, {result['machine']['torch_threads']} thread(s)")
    O.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-lengths", default="100,230,350,470")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--long-prompt", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 repeats, a 4096-token long prompt")
    O.add_output_arguments(parser)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.long_prompt = 3, 4096
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build()
    load_before = M.loadavg()
    result = {"model": MODEL, "hmt": HMT, "loadavg_before": load_before}
    result["ragged"] = ragged_batch(model, [int(x) for x in args.prompt_lengths.split(",")], args.new_tokens,
                                    args.repeats)
    print("ragged", {k: v for k, v in result["ragged"].items() if k != "timings"}, flush=True)
    result["ceiling"] = ceiling(model, len(result["ragged"]["prompt_lengths"]), repeats=4 * args.repeats)
    print("ceiling", result["ceiling"]["speedup_one_call_over_separate"], flush=True)
    result["prefill"] = prefill(model, args.long_prompt, args.repeats)
    print("prefill", {k: v for k, v in result["prefill"].items() if k != "timings"}, flush=True)
    result["loadavg_after"] = M.loadavg()
    O.save_results("benchmarks.decoding", "decoding", args, result, lambda p: plot(result | {"machine": O.machine_info()}, p))


if __name__ == "__main__":
    main()
