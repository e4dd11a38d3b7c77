"""Probe: a forward worker's CPU per text with a forward pass that costs nothing, in-process.

    python -m benchmarks.probes.forward_worker [--rounds 15] [--workers N | --arrivals]

3,000 corpus paragraphs, tokenized once in messages of 64, go through a Queue and Batcher._run
on this thread (no other thread, no gRPC): queueing, cutting, padding, the stand-in forward
pass (views of one random buffer), pooling, settling the jobs, packing. Prints the CPU per text
(the least and the median of the rounds; the machine is noisy) and the calls that cost the
most, by cProfile. host_path.py measures the same path inside a served stream.

With --workers N, the same jobs are submitted to a Batcher's own N forward workers instead (as a
stream's read-ahead submits them, all at once), and what is printed is the forward workers' CPU
per text and their voluntary context switches per text (each one a wait: for the GIL, a lock,
or work). Run it pinned (`taskset -c 0`) and not, to see what threads side by side cost.

With --arrivals, each message comes to an empty queue (a forward pass that keeps up with one
stream, as a GPU's does) and is cut as on the CPU and as on a GPU: passes a message, CPU a text.
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
    parser.add_argument("--workers", type=int, default=0,
                        help="submit to a Batcher with this many forward workers")
    parser.add_argument("--arrivals", action="store_true",
                        help="messages one at a time into an empty queue, cut as on the CPU "
                             "and as on a GPU")
    args = parser.parse_args()
    import torch

    from bertstream.server.batcher import Batcher
    from bertstream.server.engine import Engine
    from bertstream.server.jobs import Job
    from bertstream.server.text_queue import Queue

    engine = Engine(device="cpu", dtype="float32", threads=None if args.workers else 1,
                    forward_workers=args.workers or 1)
    flat = torch.randn(1024 * 512 * engine.hidden_size)

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
    batcher = Batcher([engine], 1024)  # its own workers stay idle: nothing is submitted

    def one_round():
        queue, caller = Queue(1024), object()
        for number, tokens in enumerate(messages):
            queue.add(Job(tokens.ids, options, "float32", lambda result: None, caller=caller,
                          sequence=number, engine=engine))
        while queue.waiting:
            batcher._run(queue.cut(), 0)

    if args.workers:
        return with_workers(engine, messages, options, args.rounds, len(texts))
    if args.arrivals:
        return arrivals(engine, batcher, messages, options, args.rounds, len(texts))
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


def arrivals(engine, batcher, messages, options, rounds: int, texts: int) -> None:
    """Each message into an empty queue and cut until it is gone, as when the forward pass
    keeps up with one stream (a GPU's): the passes a message takes and the worker path's CPU
    a text, with the CPU's budget and cut rules and with a GPU's (the device's budget alone,
    then its free padding too), rounds interleaved."""
    from bertstream.server.jobs import Job
    from bertstream.server.limits import BATCH_TOKENS_BY_DEVICE, FREE_PADDING_FLOPS_BY_DEVICE
    from bertstream.server.text_queue import Queue

    rules = {"CPU": (BATCH_TOKENS_BY_DEVICE["cpu"], 0),
             "GPU budget, no free padding": (BATCH_TOKENS_BY_DEVICE["cuda"], 0),
             "GPU": (BATCH_TOKENS_BY_DEVICE["cuda"], FREE_PADDING_FLOPS_BY_DEVICE["cuda"])}

    def one_round(budget: int, free: float) -> int:
        caller, passes = object(), 0
        for number, tokens in enumerate(messages):
            queue = Queue(budget, engine.forward_flops, free)
            queue.add(Job(tokens.ids, options, "float32", lambda result: None, caller=caller,
                          sequence=number, engine=engine))
            while queue.waiting:
                batcher._run(queue.cut(), 0)
                passes += 1
        return passes

    seconds = {rule: [] for rule in rules}
    passes = {rule: one_round(*rules[rule]) for rule in rules}  # and warm up
    for _ in range(rounds):
        for rule, (budget, free) in rules.items():
            started = time.thread_time()
            one_round(budget, free)
            seconds[rule].append(time.thread_time() - started)
    print(machine())
    print("| cut as on | passes a message | worker path, µs a text (median) |")
    print("| --- | ---: | ---: |")
    for rule in rules:
        print(f"| {rule} | {passes[rule] / len(messages):.2f} | "
              f"{statistics.median(seconds[rule]) / texts * 1e6:.1f} |")


def with_workers(engine, messages, options, rounds: int, texts: int) -> None:
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

    batcher = Batcher([engine], 1024)
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
