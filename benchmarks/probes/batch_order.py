"""Probe: the batcher's Queue against padding and the wait for answers, simulated offline on the
corpus lengths (no model). Streams (one by default) of messages of 64 texts with the client's
window of 64 messages in flight (the next one sent when the oldest is answered), two forward
workers, a pass taking time in proportion to its padded tokens (the unit: one full batch), plus
--fixed batches for every pass.

    python benchmarks/probes/batch_order.py [--texts 600] [--budget 1024] [--streams 1] [--fixed 0]

Rows: the offline loop (every text sorted at once, batches shared by the workers), the Queue with
sorted runs only (the rule before lead messages), and the Queue with its first message cut as a
lead at several LEAD_SPREADs. Columns: batches cut; padded over real tokens; the simulated time
of the whole job over the offline loop's; when the first and the median answer come back, in
batch times.
"""
import argparse
import heapq
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.corpus import stdlib_paragraphs  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from bertstream.server.batcher import Queue  # noqa: E402
from bertstream.server.engine import default_model_path  # noqa: E402

MESSAGE, WORKERS = 64, 2
CLIENT_WINDOW = 64  # the client's default
SPREADS = (1.25, 1.5, 2.0)


SEQUENCE = itertools.count()


class Message:
    def __init__(self, lengths, caller):
        self.ids = [range(n) for n in lengths]
        self.caller = caller
        self.sequence = next(SEQUENCE)
        self.left = len(lengths)


class RunsOnly(Queue):
    """Every cut a sorted run: no lead messages."""

    def add(self, job):
        super().add(job)
        self._leads.clear()


def simulate(lengths, queue: Queue, streams: int = 1, fixed: float = 0.0):
    """`streams` streams of lengths[i::streams], their messages sent in turn; each stream's
    answers come back in its order. Returns padded tokens, the time the last answer came, and
    every answer's time."""
    messages = []
    for number in range(streams):
        own, caller = lengths[number::streams], object()
        messages.append([Message(own[i:i + MESSAGE], caller) for i in range(0, len(own), MESSAGE)])
    sent = [min(CLIENT_WINDOW, len(m)) for m in messages]
    for at in range(max(sent)):  # the streams start side by side
        for number in range(streams):
            if at < sent[number]:
                queue.add(messages[number][at])
    answered, answers, now, padded, batches = [0] * streams, [], 0.0, 0, 0
    running, free = [], list(range(WORKERS))
    while any(answered[n] < len(messages[n]) for n in range(streams)):
        while free and queue.waiting:
            batch = queue.cut()
            cost = len(batch) * batch[-1].length
            padded += cost
            batches += 1
            heapq.heappush(running, (now + fixed + cost / queue.budget, free.pop(), id(batch),
                                     batch))
        now, worker, _, batch = heapq.heappop(running)
        free.append(worker)
        for item in batch:
            item.job.left -= 1
        for number, own in enumerate(messages):
            while answered[number] < len(own) and own[answered[number]].left == 0:  # in order
                answers.append(now)
                answered[number] += 1
                if sent[number] < len(own):
                    queue.add(own[sent[number]])
                    sent[number] += 1
    return padded, now, answers, batches


def offline(lengths, budget, fixed: float = 0.0):
    batches, batch = [], []
    for n in sorted(lengths):
        if batch and (len(batch) + 1) * n > budget:
            batches.append(batch)
            batch = []
        batch.append(n)
    batches.append(batch)
    finish = [0.0] * WORKERS
    for b in batches:
        worker = finish.index(min(finish))
        finish[worker] += fixed + len(b) * max(b) / budget
    return sum(len(b) * max(b) for b in batches), max(finish), len(batches)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--fixed", type=float, default=0.0, help="a pass's fixed cost, in "
                        "full batches (beside the cost of its padded tokens)")
    parser.add_argument("--streams", type=int, default=1, help="streams side by side, each "
                        "of every n-th text (the throughput benchmark's four streams: 4)")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    texts = list(stdlib_paragraphs()[:args.texts])
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
    real = sum(lengths)
    padded, took, count = offline(lengths, args.budget, args.fixed)
    print(f"{len(texts)} corpus texts, {real} tokens, budget {args.budget}, "
          f"{args.streams} stream(s)\n")
    print("| rule | batches | padding | job time / offline | first answer | median answer |\n"
          "|---|---:|---:|---:|---:|---:|")
    print(f"| offline loop | {count} | {padded / real - 1:.1%} | 1.000 | {took:.1f} | "
          f"{took:.1f} |")
    spread = Queue.LEAD_SPREAD
    rules = [("sorted runs only", RunsOnly)]
    rules += [(f"first message as a lead, spread {s}", s) for s in SPREADS]
    for name, rule in rules:
        if isinstance(rule, float):
            Queue.LEAD_SPREAD, rule = rule, Queue
        p, t, answers, batches = simulate(lengths, rule(args.budget), args.streams, args.fixed)
        Queue.LEAD_SPREAD = spread
        print(f"| {name} | {batches} | {p / real - 1:.1%} | {t / took:.3f} | {answers[0]:.1f} | "
              f"{statistics.median(answers):.1f} |")


if __name__ == "__main__":
    main()
