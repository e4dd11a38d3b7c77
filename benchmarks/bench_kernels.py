"""Pooling kernels vs torch and numpy, in one run.

    python -m benchmarks.bench_kernels [--repeat 30] [--cold]

GB/s counts the bytes of real tokens read (sum(lengths) x hidden x 4); padding is not counted, as a
masked kernel never needs to read it. Ratios are against torch's usual masked mean on the same input.
Warm (default): the input stays in cache between repeats, as hidden states fresh from a forward pass
partly do. --cold: a 512 MB buffer is read before every timed call, so the input comes from memory.
"""

import argparse
import time

import numpy as np
import torch

from bertstream import ext


EVICTION_BUFFER = None


def evict_caches():
    EVICTION_BUFFER.sum()


def best_seconds(fn, repeat: int, cold: bool) -> float:
    fn()  # warm-up (thread pools, page faults of the output)
    times = []
    for _ in range(repeat):
        if cold:
            evict_caches()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def candidates(hidden: np.ndarray, lengths: np.ndarray):
    h = torch.from_numpy(hidden)
    mask = (torch.arange(hidden.shape[1])[None, :] < torch.from_numpy(lengths)[:, None])
    mask_f = mask.unsqueeze(-1).to(h.dtype)
    pad = ~mask.unsqueeze(-1)

    def numpy_mean():
        return np.stack([hidden[b, :n].mean(0) for b, n in enumerate(lengths)])

    def numpy_max():
        return np.stack([hidden[b, :n].max(0) for b, n in enumerate(lengths)])

    return {
        "torch masked mean (h*m).sum/m.sum": lambda: (h * mask_f).sum(1) / mask_f.sum(1),
        "torch masked max masked_fill.amax": lambda: h.masked_fill(pad, float("-inf")).amax(1),
        "numpy per-row mean": numpy_mean,
        "numpy per-row max": numpy_max,
        "bertstream.ext masked_mean": lambda: ext.masked_mean(hidden, lengths),
        "bertstream.ext masked_max": lambda: ext.masked_max(hidden, lengths),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--cold", action="store_true", help="evict caches before each timed call")
    args = parser.parse_args()
    global EVICTION_BUFFER
    EVICTION_BUFFER = np.ones(512 * 2**20 // 8) if args.cold else None
    rng = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
          f"{ext.default_threads()} kernel threads, {'cold' if args.cold else 'warm'} caches\n")
    print("| shape | method | ms | GB/s (real tokens) | x torch mean |")
    print("|---|---|---:|---:|---:|")
    for shape in [(64, 256, 384), (32, 512, 768)]:
        batch, seq, hidden_size = shape
        hidden = rng.standard_normal(shape, dtype=np.float32)
        lengths = rng.integers(8, seq + 1, size=batch)
        real_bytes = int(lengths.sum()) * hidden_size * 4
        results = {name: best_seconds(fn, args.repeat, args.cold)
                   for name, fn in candidates(hidden, lengths).items()}
        baseline = results["torch masked mean (h*m).sum/m.sum"]
        for name, seconds in results.items():
            print(f"| {shape} | {name} | {seconds * 1e3:.3f} | {real_bytes / seconds / 1e9:.1f} "
                  f"| {baseline / seconds:.2f} |")


if __name__ == "__main__":
    main()
