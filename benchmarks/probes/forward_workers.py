"""Probe: one forward pass at a time on every core (an OpenMP team) against one single-threaded
forward pass per core side by side, over the corpus's token-budget batches; five alternating
rounds in one run.

    python benchmarks/probes/forward_workers.py [--dtype bfloat16] [--budget 1024]
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.bench_throughput import BATCH_TOKENS, InProcess, timed_side_by_side  # noqa: E402
from tests.corpus import stdlib_paragraphs  # noqa: E402

from bertstream import ext  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--dtype", default="bfloat16")
parser.add_argument("--budget", type=int, default=BATCH_TOKENS["cpu"])
args = parser.parse_args()
cores = ext.default_threads()
torch.set_num_threads(1)  # as in the server: torch computes on the workers only
base = InProcess(args.dtype, "cpu", args.budget)
batches = base.padded_batches(stdlib_paragraphs()[:1000])


def work(part, threads):
    torch.set_num_threads(threads)
    with torch.inference_mode():
        for batch in part:
            base.model(**batch)


def one_team():
    return timed_side_by_side(work, [(batches, cores)])


def side_by_side():
    return timed_side_by_side(work, [(batches[i::cores], 1) for i in range(cores)])


one_team(), side_by_side()
rounds = [(one_team(), side_by_side()) for _ in range(5)]
print(f"{args.dtype}, budget {args.budget}, {cores} cores: one pass on {cores} threads / "
      f"{cores} single-threaded passes, time per round:",
      " ".join(f"{a / b:.3f}" for a, b in rounds),
      f"(median speed-up {statistics.median(a / b for a, b in rounds):.3f})")
