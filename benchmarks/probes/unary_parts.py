"""Probe: the parts of a unary call's latency, each measured on its own (p50 of 100 calls).

    python -m benchmarks.probes.unary_parts [--dtype bfloat16]

gRPC alone (Info, which does no work) against Embed of one short text on a served model; the
forward pass of that text on one and on all cores; tokenizing it one text at a time against
encode_batch; tokenizer CPU for 1,000 paragraphs, encode_batch against encode_batch_fast; the
core alone (Core.embed on an event loop with the real batcher, no gRPC) beyond its queue and
compute time; and what setting a forward worker's torch threads 1 -> 2 -> 1 around a lone pass
costs (interleaved with passes that change nothing). The last two run after the others, on
worker threads (a second OpenMP team in the process: their compute times are not comparable).
"""
import argparse
import asyncio
import statistics
import threading
import time

import numpy as np


from benchmarks.bench_throughput import BATCH_TOKENS, Server, timed
from benchmarks.harness import stdlib_paragraphs

from bertstream import ext
from bertstream.client import Client
from bertstream.server.engine import Engine

parser = argparse.ArgumentParser()
parser.add_argument("--dtype", default="bfloat16")
args = parser.parse_args()
short = "The quick brown fox jumps over the lazy dog."


def p50_ms(fn, repeat=100):
    fn()
    return statistics.median(timed(fn) for _ in range(repeat)) * 1e3


server = Server(args.dtype, "cpu", BATCH_TOKENS["cpu"])
try:
    with Client(server.target, timeout=60) as client:
        print(f"gRPC Info (no work): {p50_ms(client.info):.2f} ms")
        totals, queued, computed = [], [], []
        for _ in range(101):
            totals.append(timed(lambda: client.embed([short])))
            queued.append(client.last_usage.queue_ns / 1e9)
            computed.append(client.last_usage.compute_ns / 1e9)
        total, queue, compute = (statistics.median(v[1:]) * 1e3
                                 for v in (totals, queued, computed))
        print(f"Embed one short text: {total:.2f} ms; on the server: queued (submit to the "
              f"forward worker's start) {queue:.2f} ms, computing (forward, pooling, packing) "
              f"{compute:.2f} ms; the rest (gRPC both ways, the client, validation, tokenizing, "
              f"waking the event loop) {total - queue - compute:.2f} ms")
finally:
    server.stop()

engine = Engine(dtype=args.dtype)
ids = engine.tokenize([short]).ids
for threads in (ext.default_threads(), 1):
    engine.set_forward_threads(threads)
    print(f"forward of the short text on {threads} thread(s): "
          f"{p50_ms(lambda: engine.forward(ids)):.2f} ms")
tokenizer = engine._truncating
print(f"tokenize the short text: encode {p50_ms(lambda: tokenizer.encode(short)) * 1e3:.0f} us, "
      f"encode_batch {p50_ms(lambda: tokenizer.encode_batch([short])) * 1e3:.0f} us")
paragraphs = stdlib_paragraphs()[:1000]
for name in ("encode_batch", "encode_batch_fast"):
    encode = getattr(tokenizer, name)
    cpu = []
    for _ in range(3):
        start = time.process_time()
        for i in range(0, len(paragraphs), 64):
            encode(paragraphs[i:i + 64])
        cpu.append(time.process_time() - start)
    print(f"{name}, 1,000 paragraphs in messages of 64: {statistics.median(cpu):.3f} s CPU")


async def core_rest(repeat: int = 200) -> float:
    """Core.embed of the short text beyond its queue and compute time (p50, ms)."""
    from bertstream.server.admission import Admission
    from bertstream.server.batcher import Batcher
    from bertstream.server.core import Core, EmbedCall
    from bertstream.server.limits import Limits

    limits = Limits(max_batch_tokens=BATCH_TOKENS["cpu"])
    admissions = {lane: Admission(limits.max_queue_texts, asyncio.get_running_loop())
                  for lane in ("interactive", "bulk")}
    batcher = Batcher(engine, limits.max_batch_tokens,
                      on_leave=lambda lane, texts: admissions[lane].release(texts))
    core = Core(engine, batcher, limits, admissions)
    rest = []
    try:
        for number in range(repeat + 10):
            start = time.perf_counter_ns()
            result = await core.embed(EmbedCall([short]))
            usage = result.usage
            if number >= 10:
                rest.append(time.perf_counter_ns() - start - usage.queue_ns - usage.compute_ns)
    finally:
        batcher.close()
    return statistics.median(rest) / 1e6


print(f"Core.embed without gRPC, beyond queue and compute: {asyncio.run(core_rest()):.2f} ms")


def thread_toggle() -> None:
    options = engine.options()
    rows = np.arange(1)

    def one_pass():
        hidden, lengths = engine.forward(ids)
        engine.pool(hidden, lengths, rows, options)

    engine.init_forward_threads(1)
    toggled, steady = [], []
    for _ in range(300):
        engine.set_forward_threads(1)
        one_pass()  # as a one-core batch before the lone one
        start = time.perf_counter()
        engine.set_forward_threads(2)
        one_pass()
        toggled.append(time.perf_counter() - start)
        one_pass()
        start = time.perf_counter()
        one_pass()
        steady.append(time.perf_counter() - start)
    print(f"a lone pass on 2 threads right after a 1-thread one (set 1 -> 2): "
          f"{statistics.median(toggled) * 1e3:.2f} ms; after a 2-thread one: "
          f"{statistics.median(steady) * 1e3:.2f} ms")


worker = threading.Thread(target=thread_toggle)
worker.start()
worker.join()
