"""Probe: the batcher's Queue under the largest backlog it admits (no model): 100 jobs of 1,000
texts from 10 streams past their first message (about 100,000 texts, lengths 5-256), then 50
more messages of 64 texts from one of them, one 10,000-text request (the largest legal one),
then 200 cuts. These run under the batcher's lock,
so they hold up every other worker and submitter.

    python -m benchmarks.probes.queue_cost
"""
import random
import statistics
import time

from tests.test_queue import FakeJob

from bertstream.server.text_queue import Queue

random.seed(0)
queue = Queue(1024)
for caller in [object() for _ in range(10)]:
    for _ in range(10):
        queue.add(FakeJob([random.randint(5, 256) for _ in range(1000)], caller))
queue._leads.clear()  # streams past their first message: sorted runs
stream = queue._lines and next(iter(queue._lines))  # one of those streams: its next messages
messages = []
for _ in range(50):  # a stream's messages of 64 texts (on the event loop, as submit() adds them)
    message = FakeJob([random.randint(5, 256) for _ in range(64)], stream)
    start = time.perf_counter()
    queue.add(message)
    messages.append(time.perf_counter() - start)
request = FakeJob([random.randint(5, 256) for _ in range(10_000)])
start = time.perf_counter()
queue.add(request)
added = time.perf_counter() - start
cuts = []
for _ in range(200):
    start = time.perf_counter()
    queue.cut()
    cuts.append(time.perf_counter() - start)
print(f"about 100,000 waiting texts: add a stream's message of 64 texts p50 "
      f"{statistics.median(messages) * 1e3:.2f} ms; add a 10,000-text request "
      f"{added * 1e3:.1f} ms; cut p50 {statistics.median(cuts) * 1e3:.2f} ms, "
      f"max {max(cuts) * 1e3:.2f} ms over 200 cuts")
