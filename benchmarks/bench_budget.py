"""Token budget per forward pass vs throughput of the in-process loop, float32 and bfloat16.

    python -m benchmarks.bench_budget [--texts 600]

Chooses the server's default --max-batch-tokens for a device; run it on the machine in question.
"""

import argparse
import statistics
import time

import torch

from benchmarks.bench_throughput import InProcess, stdlib_paragraphs

from bertstream import ext


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budgets", default="512,1024,2048,4096,8192")
    args = parser.parse_args()
    torch.set_num_threads(ext.default_threads())
    texts = list(stdlib_paragraphs()[:args.texts])
    budgets = [int(b) for b in args.budgets.split(",")]
    print(f"{len(texts)} texts, {args.device}, median of 3 rounds (texts/s)\n")
    print("| dtype | " + " | ".join(f"{b} tokens" for b in budgets) + " |")
    print("|---|" + "---:|" * len(budgets))
    for dtype in ("float32", "bfloat16"):
        loop = InProcess(dtype, args.device, budgets[0])
        loop.embed(texts[:64])
        rates = []
        for budget in budgets:
            loop.batch_tokens = budget
            seconds = statistics.median(
                _timed(lambda: loop.embed(texts)) for _ in range(3))
            rates.append(len(texts) / seconds)
        print(f"| {dtype} | " + " | ".join(f"{r:.0f}" for r in rates) + " |", flush=True)


def _timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
