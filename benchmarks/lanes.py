"""Interactive calls beside a bulk stream, in one run: what the two lanes buy.

    python -m benchmarks.lanes [--texts 20000] [--rate 20] [--idle-seconds 10]

One `bertstream serve` with two models, the packaged model twice under two names (a, b), float32,
CPU. Measured, in order: one-text interactive `Embed` calls to a at a steady rate on an idle
server (p50, p99); a bulk stream of the corpus to a alone (texts/s, and the mean forward time of
its batches from the server's metrics); then both at once: the stream in the bulk lane with the
calls on its model, the same with the calls on the other model (b), and the stream in the
interactive lane (where every caller shared one lane before). Printed: the interactive p50/p99
and refusals beside idle plus one bulk batch's forward time, and the stream's throughput against
alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

from benchmarks.harness import free_port, machine, stdlib_paragraphs


def serve(metrics_port: int, *more: str) -> tuple[subprocess.Popen, str]:
    """`bertstream serve` (float32, CPU, metrics on metrics_port) with more arguments; returns
    once every model it serves has answered."""
    from bertstream.client import Client

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "bertstream.server.cli", "serve", "--port", str(port),
         "--dtype", "float32", "--device", "cpu", "--metrics-port", str(metrics_port),
         "--log-level", "WARNING", *more], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    target = f"127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with Client(target, timeout=5) as client:
                for model in client.list_models():
                    client.embed(["warm-up"], model=model["name"])
            return process, target
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.3)


def forward_seconds(metrics_port: int) -> tuple[float, float]:
    """(sum, count) of the server's bertstream_forward_seconds histogram, every model's."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    total, count = 0.0, 0.0
    for line in text.splitlines():
        if line.startswith("bertstream_forward_seconds_sum"):
            total += float(line.split()[-1])
        elif line.startswith("bertstream_forward_seconds_count"):
            count += float(line.split()[-1])
    return total, count


def interactive(target: str, rate: float, stop: threading.Event, seconds: float | None = None,
                model: str | None = None):
    """One-text Embed calls (to `model`) every 1/rate s until stop (or for `seconds`):
    latencies, refusals."""
    import grpc

    from bertstream.client import Client

    latencies, refused = [], 0
    with Client(target, timeout=60) as client:
        ends = time.perf_counter() + seconds if seconds else None
        next_call = time.perf_counter()
        while not stop.is_set() and (ends is None or time.perf_counter() < ends):
            started = time.perf_counter()
            try:
                client.embed(["what does an interactive caller ask"], model=model)
                latencies.append(time.perf_counter() - started)
            except grpc.RpcError:
                refused += 1
            next_call += 1 / rate
            time.sleep(max(0.0, next_call - time.perf_counter()))
    return latencies, refused


def bulk(target: str, texts, priority: str, model: str | None = None) -> float:
    """Seconds to stream every text to `model` (checked: every row back)."""
    from bertstream.client import Client

    started = time.perf_counter()
    rows = 0
    with Client(target, timeout=3600, model=model) as client:
        for part in client.stream(texts, batch_size=64, window=64, priority=priority):
            rows += len(part)
    assert rows == len(texts), (rows, len(texts))
    return time.perf_counter() - started


def percentile(values, share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=20.0, help="interactive calls per second")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    args = parser.parse_args()
    corpus = stdlib_paragraphs()
    texts = [corpus[i % len(corpus)] for i in range(args.texts)]
    metrics_port = free_port()
    from bertstream.server.engine import default_model_path

    path = default_model_path()
    process, target = serve(metrics_port, "--model", f"a={path}", "--model", f"b={path}")
    try:
        bulk(target, texts[:500], "bulk", "a")  # warm
        idle, _ = interactive(target, args.rate, threading.Event(), args.idle_seconds, "a")
        before = forward_seconds(metrics_port)
        alone = bulk(target, texts, "bulk", "a")
        after = forward_seconds(metrics_port)
        batch_s = (after[0] - before[0]) / (after[1] - before[1])
        print(f"{machine()}; {args.texts:,} corpus paragraphs in messages of 64; one-text "
              f"interactive Embed calls at {args.rate:g}/s")
        print(f"\nidle: p50 {statistics.median(idle) * 1000:.1f} ms, p99 "
              f"{percentile(idle, 0.99) * 1000:.1f} ms ({len(idle)} calls); bulk alone "
              f"{args.texts / alone:,.0f} texts/s, its batches' mean forward "
              f"{batch_s * 1000:.0f} ms\n")
        print("| the stream's lane | the calls' model | interactive p50 | p99 | bound (idle + "
              "one batch) p50 / p99 | refused | stream texts/s | x alone |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for lane, model in (("bulk", "a"), ("bulk", "b"), ("interactive", "a")):
            stop, result = threading.Event(), {}
            caller = threading.Thread(target=lambda: result.update(
                zip(("latencies", "refused"), interactive(target, args.rate, stop,
                                                          model=model))))
            caller.start()
            took = bulk(target, texts, lane, "a")
            stop.set()
            caller.join()
            latencies = result["latencies"]
            print(f"| {lane} | {'the same (a)' if model == 'a' else 'another (b)'} | "
                  f"{statistics.median(latencies) * 1000:.0f} ms | "
                  f"{percentile(latencies, 0.99) * 1000:.0f} ms | "
                  f"{(statistics.median(idle) + batch_s) * 1000:.0f} / "
                  f"{(percentile(idle, 0.99) + batch_s) * 1000:.0f} ms | {result['refused']} | "
                  f"{args.texts / took:,.0f} | {alone / took:.2f} |")
    finally:
        process.terminate()
        process.wait(timeout=60)


if __name__ == "__main__":
    main()
