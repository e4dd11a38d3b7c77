"""Probe: torch.compile (inductor, dynamic shapes) vs eager, bfloat16, the in-process loop.

    python benchmarks/probes/compile.py
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_throughput import InProcess, stdlib_paragraphs  # noqa: E402

texts = list(stdlib_paragraphs()[:600])
loop = InProcess("bfloat16", "cpu", 1024)


def rate():
    start = time.perf_counter()
    loop.embed(texts)
    return len(texts) / (time.perf_counter() - start)


loop.embed(texts[:64])
print(f"eager: {rate():.1f} {rate():.1f} texts/s", flush=True)
eager = loop.model
start = time.perf_counter()
loop.model = torch.compile(eager, dynamic=True)
loop.embed(texts)
print(f"compile + first pass: {time.perf_counter() - start:.1f} s", flush=True)
print(f"compiled: {rate():.1f} {rate():.1f} texts/s", flush=True)
loop.model = eager
print(f"eager again: {rate():.1f} texts/s")
