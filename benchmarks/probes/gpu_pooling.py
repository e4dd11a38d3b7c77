"""Probe (CUDA only): pooling on the device (server/device_pooling.py, the default on a GPU:
limits.POOL_ON_DEVICE) against copying every hidden state to the host for the Cython kernels, on
real forward passes of corpus batches (`make gpu-check` runs it).

    python -m benchmarks.probes.gpu_pooling [--dtype float16] [--texts 2000] [--budget 32768]

Per batch, after the forward pass (synchronized), Engine.pool both ways:
- host: every hidden state row copied to the host, pooled by bertstream.ext;
- device: pooled in torch on the device, then only the pooled (rows, hidden) copied.
Prints the median milliseconds of each per batch shape, and their ratio, and checks that both
give the same vectors (float32 tolerance of the precision). The ratio settles POOL_ON_DEVICE.
"""
import argparse
import statistics
import sys
import time

import numpy as np
import torch

from benchmarks.harness import stdlib_paragraphs

from bertstream.server.engine import Engine


def budget_batches(ids, budget: int) -> list:
    """Length-sorted runs of rows x longest <= budget, as the batcher cuts a full window."""
    batches, batch = [], []
    for row in sorted(ids, key=len):
        if batch and (len(batch) + 1) * len(row) > budget:
            batches.append(batch)
            batch = []
        batch.append(row)
    return batches + [batch]


def timed_ms(fn, repeat: int = 20) -> tuple[float, object]:
    out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--budget", type=int, default=32768)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_pooling: no CUDA device here; this probe measures the GPU path only")
    engine = Engine(device="cuda", dtype=args.dtype)
    options = engine.options("mean", (), "concat", False)
    batches = budget_batches(engine.tokenize(list(stdlib_paragraphs()[:args.texts])).ids,
                             args.budget)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, budget {args.budget} tokens, "
          f"{len(batches)} batches of {args.texts} corpus texts\n")
    print("| rows x longest | host copy + ext kernel, ms | device pooling + copy, ms | "
          "device / host |\n|---|---:|---:|---:|")
    for ids in (batches[0], batches[len(batches) // 2], batches[-1]):
        hidden_states, lengths = engine.forward(ids)
        rows = np.arange(len(ids))
        times = {}
        for on_device in (False, True):
            engine.pool_on_device = on_device
            times[on_device] = timed_ms(lambda: engine.pool(hidden_states, lengths, rows, options))
        (host_ms, host), (dev_ms, dev) = times[False], times[True]
        # the same hidden states, both accumulated in float32: equal to float32 rounding
        np.testing.assert_allclose(dev, host, rtol=1e-5, atol=1e-5)
        shape = f"{len(ids)} x {int(lengths.max())}"
        print(f"| {shape} | {host_ms:.3f} | {dev_ms:.3f} | {dev_ms / host_ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
