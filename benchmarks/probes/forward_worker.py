"""Probe: a forward worker's CPU per text with a forward pass that costs nothing, in-process.

    python -m benchmarks.probes.forward_worker [--rounds 15] [--workers N] [--batch-tokens N]

3,000 corpus paragraphs, tokenized once in messages of 64, go through a Queue and Batcher._run
on this thread (no other thread, no gRPC): queueing, cutting, padding, the stand-in forward
pass (views of one random buffer), pooling, settling the jobs, packing. Prints the CPU per text
(the least and the median of the rounds; the machine is noisy) and the calls that cost the
most, by cProfile. host_path.py measures the same path inside a served stream.

With --workers N, the same jobs are submitted to a Batcher's own N forward workers instead (as a
stream's read-ahead submits them, all at once), and what is printed is the forward workers' CPU
per text and their voluntary context switches per text (each one a wait: for the GIL, a lock,
or work). Run it pinned (`taskset -c 0`) and not, to see what threads side by side cost.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

from benchmarks.harness import machine, stdlib_paragraphs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch-tokens", type=int, default=1024,
                        help="the token budget of a batch (a GPU's: 32768)")
    parser.add_argument("--workers", type=int, default=0,
                        help="submit to a Batcher with this many forward workers")
    args = parser.parse_args()
    import torch

    from bertstream.server.batcher import Batcher
    from bertstream.server.engine import Engine
    from bertstream.server.jobs import Job
    from bertstream.server.text_queue import Queue

    engine = Engine(device="cpu", dtype="float32", threads=None if args.workers else 1,
                    forward_workers=args.workers or 1)
    budget = args.batch_tokens
    flat = torch.randn(max(budget, engine.max_length) * engine.hidden_size)  # rows x longest

    def stand_in(input_ids, attention_mask, **_):
        rows, longest = input_ids.shape
        layer = flat[:rows * longest * engine.hidden_size].view(rows, longest,
                                                                engine.hidden_size)
        return (layer,) * (engine.num_layers + 1)

    engine.run_model = stand_in
    texts = list(stdlib_paragraphs()[:3000])
    options = engine.options()
    messages = [engine.tokenize(texts[i:i + 64], prompt=options.prompt)
                for i in range(0, len(texts), 64)]
    batcher = Batcher([engine], budget)  # its own workers stay idle: nothing is submitted

    def one_round():
        queue, caller = Queue(budget), object()
        for number, tokens in enumerate(messages):
            queue.add(Job(tokens.ids, options, "float32", lambda result: None, caller=caller,
                          sequence=number, engine=engine))
        while queue.waiting:
            batcher._run(queue.cut(), 0)

    if args.workers:
        return with_workers(engine, messages, options, args.rounds, len(texts), budget)
    one_round()
    seconds = []
    for _ in range(args.rounds):
        started = time.thread_time()
        one_round()
        seconds.append(time.thread_time() - started)
    print(machine())
    print(f"forward worker path: {min(seconds) / len(texts) * 1e6:.1f} µs a text at least, "
          f"median {statistics.median(seconds) / len(texts) * 1e6:.1f} µs "
          f"({args.rounds} rounds of {len(texts):,} texts)")
    profile = cProfile.Profile()
    profile.enable()
    one_round()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)
    batcher.close()


def with_workers(engine, messages, options, rounds: int, texts: int, budget: int) -> None:
    """The jobs through a Batcher's own forward workers: their CPU and voluntary switches."""
    import os
    import threading
    from pathlib import Path

    from bertstream.server.batcher import Batcher
    from bertstream.server.jobs import Job

    def workers_now() -> tuple[float, int]:
        cpu = switches = 0
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():
            if (task / "comm").read_text().startswith("bertstream-forw"):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                cpu += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                status = (task / "status").read_text()
                switches += int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        return cpu, switches

    batcher = Batcher([engine], budget)
    runs = []
    for _ in range(rounds + 1):  # the first warms up
        done, caller = threading.Semaphore(0), object()
        cpu, switches = workers_now()
        for number, tokens in enumerate(messages):
            batcher.submit(Job(tokens.ids, options, "float32", lambda result: done.release(),
                               caller=caller, sequence=number, engine=engine))
        for _ in messages:
            done.acquire()
        after = workers_now()
        runs.append(((after[0] - cpu) / texts * 1e6, (after[1] - switches) / texts))
    batcher.close()
    cpus, waits = zip(*runs[1:])
    print(machine())
    print(f"{engine.forward_workers} forward workers on {len(os.sched_getaffinity(0))} cores: "
          f"median {statistics.median(cpus):.1f} µs CPU a text, "
          f"{statistics.median(waits):.2f} voluntary switches a text ({rounds} rounds)")


if __name__ == "__main__":
    main()
