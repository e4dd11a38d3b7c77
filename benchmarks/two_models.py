"""Two models in one process against one process per model, on the same cores, in one run.

    python -m benchmarks.two_models [--texts 4000]

The packaged model twice, as two models (a, b). Two corpus streams run at once, one per model,
each of --texts paragraphs in messages of 64: first against one `bertstream serve --model a=...
--model b=...` (one queue, one set of forward workers, one copy of torch), then against two
one-model servers. Those get `--threads` each of half the cores, so that together they claim the
cores once, as the one process does (the fairest split; the naive one, both claiming every core,
is measured too). Printed: total texts/s, the ratio to one process, and the servers' resident
memory (now and peak) after the streams, summed over processes.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

from benchmarks.harness import free_port, machine, process_memory, stdlib_paragraphs
from benchmarks.lanes import bulk, serve


def streams(targets: dict[str, str], texts) -> float:
    """Seconds for one stream per model at once (model -> its server's target)."""
    took = {}

    def run(model, target):
        took[model] = bulk(target, texts, "bulk", model)

    threads = [threading.Thread(target=run, args=item) for item in targets.items()]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(took) == len(targets), "a stream failed"
    return time.perf_counter() - started


def measure(servers: list[tuple], targets: dict[str, str], texts) -> tuple[float, int, int]:
    """(texts/s, resident bytes now, peak resident bytes) of these servers running both streams."""
    streams(targets, texts[:300])  # warm
    seconds = streams(targets, texts)
    memory = [process_memory(process.pid) for process, _ in servers]
    return 2 * len(texts) / seconds, sum(now for now, _ in memory), sum(peak for _, peak in memory)


def stop(servers) -> None:
    for process, _ in servers:
        process.terminate()
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=4000, help="paragraphs per stream")
    args = parser.parse_args()
    from bertstream.server.engine import default_model_path

    corpus = stdlib_paragraphs()
    texts = [corpus[i % len(corpus)] for i in range(args.texts)]
    path, cores = default_model_path(), os.cpu_count()
    rows = []
    one = [serve(free_port(), "--model", f"a={path}", "--model", f"b={path}")]
    try:
        rows.append(("one process, both models", *measure(
            one, {"a": one[0][1], "b": one[0][1]}, texts)))
    finally:
        stop(one)
    for label, threads in ((f"two processes, {max(1, cores // 2)} thread(s) each",
                            max(1, cores // 2)), (f"two processes, {cores} threads each", cores)):
        two = [serve(free_port(), "--model", f"{name}={path}", "--threads", str(threads))
               for name in ("a", "b")]
        try:
            rows.append((label, *measure(two, {"a": two[0][1], "b": two[1][1]}, texts)))
        finally:
            stop(two)
    print(f"{machine()}; two streams at once, one per model, {args.texts:,} corpus paragraphs "
          f"each, messages of 64; float32")
    print("\n| servers | texts/s (both streams) | x one process | resident now | peak |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, rate, now, peak in rows:
        print(f"| {label} | {rate:,.0f} | {rate / rows[0][1]:.2f} | {now / 2**20:,.0f} MiB | "
              f"{peak / 2**20:,.0f} MiB |")


if __name__ == "__main__":
    main()
