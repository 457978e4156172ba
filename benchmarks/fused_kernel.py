"""CPU time of the fused LM-head log-prob kernel (`hmt_adapter.engine.lm_head.token_log_probs`), forward + backward.

    PYTHONPATH=. python -m benchmarks.fused_kernel                                   # the current kernel
    git show 7b477bc:hmt_adapter/loss.py > /tmp/loss_before.py
    PYTHONPATH=. python -m benchmarks.fused_kernel --compare /tmp/loss_before.py     # also an older kernel file

One segment of 478 tokens, d 256, V 32000, frozen head, one thread; median of 5 after checking that both
kernels give the same log-probs and input gradients. Prints a line per kernel (no files written).
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch

from hmt_adapter.engine import lm_head as current


def _load(path: str):
    spec = importlib.util.spec_from_file_location("loss_compare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _step(module, head: torch.nn.Linear, labels: torch.Tensor, tokens: int, width: int):
    hidden = torch.randn(tokens, width, generator=torch.Generator().manual_seed(1)).requires_grad_()
    log_probs, *_ = module.token_log_probs(hidden, head, labels, extras=True)
    log_probs.sum().backward()
    return log_probs.detach(), hidden.grad


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compare", help="path of another kernel file (an older loss.py or lm_head.py) to time against the current one")
    p.add_argument("--tokens", type=int, default=478)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    head = torch.nn.Linear(args.width, args.vocab, bias=False).requires_grad_(False)
    labels = torch.randint(0, args.vocab, (args.tokens,))
    kernels = {"current": current}
    if args.compare:
        kernels["compare"] = _load(args.compare)
        a, ga = _step(current, head, labels, args.tokens, args.width)
        b, gb = _step(kernels["compare"], head, labels, args.tokens, args.width)
        print(f"max |log-prob diff| {(a - b).abs().max().item():.3g}, max |grad diff| {(ga - gb).abs().max().item():.3g}")
    for name, module in kernels.items():
        times = []
        for _ in range(args.repeats):
            start = time.process_time()
            _step(module, head, labels, args.tokens, args.width)
            times.append(time.process_time() - start)
        print(f"{name}: median {sorted(times)[len(times) // 2]:.3f} CPU-s per forward + backward")


if __name__ == "__main__":
    main()
