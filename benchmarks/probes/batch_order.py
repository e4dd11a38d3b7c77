"""Probe: the batcher's Queue against padding and the wait for answers, simulated offline on the
corpus lengths (no model). One stream of messages of 64 texts with the client's window of 64
messages in flight (the next one sent when the oldest is answered), two forward workers, a pass
taking time in proportion to its padded tokens (the unit: one full batch).

    python benchmarks/probes/batch_order.py [--texts 600] [--budget 1024]

Rows: the offline loop (every text sorted at once, batches shared by the workers), the Queue with
sorted runs only (the rule before lead messages), and the Queue with its first message cut as a
lead at several LEAD_SPREADs. Columns: padded over real tokens; the simulated time of the whole
job over the offline loop's; when the first and the median answer come back, in batch times.
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


def simulate(lengths, queue: Queue):
    stream = object()
    messages = [Message(lengths[i:i + MESSAGE], stream) for i in range(0, len(lengths), MESSAGE)]
    sent = min(CLIENT_WINDOW, len(messages))
    for message in messages[:sent]:
        queue.add(message)
    answered, answers, now, padded = 0, [], 0.0, 0
    running, free = [], list(range(WORKERS))
    while answered < len(messages):
        while free and queue.waiting:
            batch = queue.cut()
            cost = len(batch) * batch[-1].length
            padded += cost
            heapq.heappush(running, (now + cost / queue.budget, free.pop(), id(batch), batch))
        now, worker, _, batch = heapq.heappop(running)
        free.append(worker)
        for item in batch:
            item.job.left -= 1
        while answered < len(messages) and messages[answered].left == 0:  # answers in order
            answers.append(now)
            answered += 1
            if sent < len(messages):
                queue.add(messages[sent])
                sent += 1
    return padded, now, answers


def offline(lengths, budget):
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
        finish[worker] += len(b) * max(b) / budget
    return sum(len(b) * max(b) for b in batches), max(finish)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=600)
    parser.add_argument("--budget", type=int, default=1024)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    texts = list(stdlib_paragraphs()[:args.texts])
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
    real = sum(lengths)
    padded, took = offline(lengths, args.budget)
    print(f"{len(texts)} corpus texts, {real} tokens, budget {args.budget}\n")
    print("| rule | padding | job time / offline | first answer | median answer |\n"
          "|---|---:|---:|---:|---:|")
    print(f"| offline loop | {padded / real - 1:.1%} | 1.000 | {took:.1f} | {took:.1f} |")
    spread = Queue.LEAD_SPREAD
    rules = [("sorted runs only", RunsOnly)]
    rules += [(f"first message as a lead, spread {s}", s) for s in (1.25, 1.5, 2.0)]
    for name, rule in rules:
        if isinstance(rule, float):
            Queue.LEAD_SPREAD, rule = rule, Queue
        p, t, answers = simulate(lengths, rule(args.budget))
        Queue.LEAD_SPREAD = spread
        print(f"| {name} | {p / real - 1:.1%} | {t / took:.3f} | {answers[0]:.1f} | "
              f"{statistics.median(answers):.1f} |")


if __name__ == "__main__":
    main()
