"""One queue for every caller; batches by token budget; forward passes run side by side.

Everything queued waits in one Queue, sorted by length. Forward workers (threads) each take the
next batch (Queue.cut): callers take turns, each cut serving the oldest message of the caller
served least recently, as a sorted run of texts of about its length that fits the token budget
(rows x longest), so none starves and little is padded; a caller's first message goes first, so a
stream's first answer comes within a batch or two. A worker pools and packs its own batch, and
settles the jobs whose last text it held.

On the CPU each worker computes on its share of the cores (one each by default): two forward
passes on one core each outrun one pass on two cores by 8-19% here (no OpenMP barriers, and the
tokenizer and gRPC threads take a core from one pass, not from a whole team). A worker alone
with a single batch (one unary call on an idle server) uses every core: latency. On a GPU, two
workers overlap one batch's host work with the other's device work. See BENCHMARKS.md.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .engine import EmbedOptions, Engine
from .errors import EmbedError, ErrorKind
from .metrics import Metrics
from .wire import Packed, pack

log = logging.getLogger("bertstream.batcher")

@dataclass
class Usage:
    tokens: int = 0
    truncated_items: int = 0
    queue_ns: int = 0
    compute_ns: int = 0


@dataclass
class JobResult:
    embeddings: Packed
    lengths: list[int] | None  # token-level only: tokens per text
    usage: Usage


@dataclass(eq=False)
class Job:
    """One request's texts on their way through the batcher. Its texts may go through several
    workers' batches: the outputs are filled under the batcher's lock."""

    ids: list[list[int]]
    options: EmbedOptions
    dtype: str
    on_done: Callable[[JobResult | EmbedError], None]
    truncated_items: int = 0
    caller: object = None  # whose work this is (a stream's messages share one); None: its own
    sequence: int = 0  # order of the request among its caller's (tokenizing may reorder jobs)
    cancelled: bool = False
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    usage: Usage = field(default_factory=Usage)
    _remaining: int = 0
    _rows: dict = field(default_factory=dict)  # text index -> its vector(s)
    _failed: bool = False

    def __post_init__(self):
        self._remaining = len(self.ids)
        self.usage.tokens = sum(len(ids) for ids in self.ids)
        self.usage.truncated_items = self.truncated_items


@dataclass(eq=False)
class _Item:
    job: Job
    index: int
    length: int
    arrival: int  # order of arrival: the smallest is the oldest
    taken: bool = False  # cut into a batch (it may still sit in its caller's line)


class _InLine:
    """One job's texts in its caller's line; `start` skips those cut from the front."""

    __slots__ = ("items", "start", "sequence", "by_length")

    def __init__(self, items: list[_Item]):
        self.items, self.start, self.sequence = items, 0, items[0].job.sequence
        self.by_length = None

    def oldest(self) -> _Item | None:
        """The oldest text not cut yet (None: all are)."""
        items = self.items
        while self.start < len(items) and items[self.start].taken:
            self.start += 1
        return items[self.start] if self.start < len(items) else None

    def left(self) -> list[_Item]:
        """Its texts not cut yet, shortest first (sorted once, when first asked)."""
        if self.by_length is None:
            self.by_length = sorted(self.items, key=lambda item: item.length)
        return [item for item in self.by_length if not item.taken]


class Queue:
    """The texts waiting for a forward pass, from every caller. Not thread-safe (the batcher
    holds its lock around every call).

    All of them wait in one pool sorted by length. Callers take turns: each cut serves the caller
    served least recently, and within it, its oldest message first; so none starves (a backlog
    delays another caller's request by about one batch).
    - Usually the batch is the run of the pool holding that caller's oldest text, where runs are
      cut greedily from the shortest so that rows x longest fits the budget: with a full pool,
      the batches of an offline loop over the sorted texts, so little is padded. (Starting the
      run at that text instead, without the runs below it, doubled the padding: fragments.)
    - A caller's first message (the first since its queue was empty: a new stream, a unary call)
      is cut as a lead instead: its texts in groups of similar length (the longest at most
      LEAD_SPREAD times the shortest; all of them when they fit one batch), each group filled
      up with the longest texts of other callers that fit under the group's longest (and are
      at least its longest / LEAD_SPREAD). Its answer then needs a batch or two, not a pass
      over every length in the pool, which is what sorted runs do to a message whose texts
      have every length: a stream's first answer came after most of the job. The caller's own
      later messages are not fillers: a batch without them is smaller, not more padded, and
      finishes sooner (BENCHMARKS.md, probes/batch_order.py).
    - One lead that needs more than one batch at a time: another new caller's long first
      message meanwhile goes by sorted runs (see add()).
    """

    LEAD_SPREAD = 1.5

    def __init__(self, budget: int):
        self.budget = budget
        self.waiting = 0  # texts not yet cut
        self._pool: list[tuple[int, int, _Item]] = []  # (length, arrival, item), sorted
        self._lines: dict[object, list[_InLine]] = {}  # caller -> its jobs, by sequence
        self._leads: set = set()  # callers whose oldest job in line is cut as a lead
        self._long_lead = None  # the one of them whose lead needs more than one batch, if any
        self._arrivals = itertools.count()
        self._cuts = 0  # batches cut so far
        self._served: dict[object, int] = {}  # caller -> the cut that last served it

    def add(self, job: Job) -> None:
        caller = job.caller or job
        items = [_Item(job, index, len(ids), next(self._arrivals))
                 for index, ids in enumerate(job.ids)]
        if caller not in self._lines:
            self._lines[caller] = []
            # A lead helps when it is whole within a few cuts. Long leads side by side take
            # turns, so none is (four new streams: the first answer after 7.7 batch times,
            # against 10.1 with sorted runs only), while their groups padded the job 9% more
            # (probes/batch_order.py --streams 4). So a lead that needs more than one batch is
            # one only while no other such lead waits; a short one (a unary call) always is.
            fits = len(items) * max(item.length for item in items) <= self.budget
            if fits or self._long_lead is None:
                self._leads.add(caller)
                if not fits:
                    self._long_lead = caller
        bisect.insort(self._lines[caller], _InLine(items), key=lambda waiting: waiting.sequence)
        entries = [(item.length, item.arrival, item) for item in items]
        if len(entries) < 32:
            for entry in entries:
                bisect.insort(self._pool, entry)
        else:  # two sorted runs: one C-level merge, not an insertion per text
            self._pool.extend(sorted(entries))
            self._pool.sort()
        self.waiting += len(items)

    def cut(self) -> list[_Item]:
        """The next batch, sorted by length (at least one text; the queue must not be empty)."""
        heads = {caller: line[0].oldest() for caller, line in self._lines.items()}
        self._served = {caller: self._served.get(caller, -1) for caller in heads}
        turn = min(heads, key=lambda c: (self._served[c], heads[c].arrival))
        self._cuts += 1
        self._served[turn] = self._cuts
        if turn in self._leads:
            batch = self._lead_batch(self._lines[turn][0].left())
            for item in batch:
                del self._pool[bisect.bisect_left(self._pool, (item.length, item.arrival))]
        else:
            batch = self._run_holding(heads[turn])
        self.waiting -= len(batch)
        for caller in {item.job.caller or item.job for item in batch}:
            line = self._lines[caller]
            while line and line[0].oldest() is None:
                del line[0]
                self._leads.discard(caller)  # its first message is all cut
                if self._long_lead is caller:
                    self._long_lead = None
            if not line:
                del self._lines[caller]
        return batch

    def _run_holding(self, anchor: _Item) -> list[_Item]:
        """The run holding the anchor, of the runs that cut the sorted pool greedily from the
        shortest (as an offline loop over the sorted texts would)."""
        pool, budget = self._pool, self.budget
        at = bisect.bisect_left(pool, (anchor.length, anchor.arrival))
        low = 0
        end = len(pool)
        while True:  # runs from the shortest, each the longest that fits: gallop, then bisect
            fits, step = low + 1, 1  # pool[low:fits] fits (one text always does)
            while fits + step <= end and (fits + step - low) * pool[fits + step - 1][0] <= budget:
                fits, step = fits + step, step * 2
            over = min(fits + step, end + 1)  # pool[low:over] does not fit, or runs past the end
            while over - fits > 1:
                middle = (fits + over) // 2
                if (middle - low) * pool[middle - 1][0] <= budget:  # sorted: the last is longest
                    fits = middle
                else:
                    over = middle
            if fits > at:
                break
            low = fits
        high = fits
        batch = [entry[2] for entry in pool[low:high]]
        del pool[low:high]
        for item in batch:
            item.taken = True
        return batch

    def _lead_batch(self, texts: list[_Item]) -> list[_Item]:
        """The shortest group of a lead job's texts (all of them if they fit one batch), filled
        up with the other callers' longest texts that fit under the group's longest."""
        if len(texts) * texts[-1].length <= self.budget:
            group = texts  # the rest of it fits one batch: one pass
        else:
            group = texts[:1]
            for item in texts[1:]:
                if ((len(group) + 1) * item.length > self.budget
                        or item.length > self.LEAD_SPREAD * group[0].length):
                    break
                group.append(item)
        longest = group[-1].length
        rows = max(1, self.budget // longest)
        fillers, caller = [], group[0].job.caller or group[0].job
        below = bisect.bisect_right(self._pool, (longest, float("inf")))
        for at in range(below - 1, -1, -1):
            item = self._pool[at][2]
            if len(group) + len(fillers) >= rows or item.length * self.LEAD_SPREAD < longest:
                break  # full; or the rest would be padded more than a group's own texts
            if (item.job.caller or item.job) is not caller:
                fillers.append(item)
        batch = sorted(group + fillers, key=lambda item: item.length)
        for item in batch:
            item.taken = True  # the caller drops them from the pool
        return batch


class Batcher:
    # This many forward passes failing in a row (nothing succeeding between them) marks the
    # engine unhealthy: the health service then says NOT_SERVING.
    UNHEALTHY_AFTER_FAILURES = 5

    def __init__(self, engine: Engine, max_batch_tokens: int, metrics: Metrics | None = None,
                 on_leave: Callable[[int], None] | None = None):
        """on_leave(n): n texts left the pool (taken into a forward pass, or dropped because
        their caller went away); called on a forward worker's thread."""
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.metrics = metrics or Metrics()
        self.on_leave = on_leave
        self.failures_in_a_row = 0
        self.workers = engine.forward_workers
        self._queue = Queue(max_batch_tokens)  # guarded by _work
        self._work = threading.Condition()
        self._idle = [False] * self.workers  # guarded by _work
        self._closing = False
        self._settling = threading.Lock()  # a job's texts may be in batches of several workers
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # submit() -> the feeder
        self._feeder = threading.Thread(target=self._feed, daemon=True, name="bertstream-feeder")
        self._feeder.start()
        self._threads = [threading.Thread(target=self._worker, args=(number,), daemon=True,
                                          name=f"bertstream-forward-{number}")
                         for number in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        """Hand a job to the batcher without waiting for the workers' lock (waited for here, it
        held the event loop 31-58 ms while a worker cut a batch at the largest backlog): queued
        at once when the lock is free, else put in an inbox, from which the feeder thread queues
        it. (The queue orders a caller's jobs by sequence, so the two ways cannot reorder them.)"""
        if not job.ids:
            raise ValueError("a job needs at least one text")
        self.metrics.queue_depth.inc(len(job.ids))
        if self._work.acquire(blocking=False):  # the usual case: no thread hop, no wake-up
            try:
                self._queue.add(job)
                self._work.notify_all()
            finally:
                self._work.release()
        else:
            self._inbox.put(job)

    def _feed(self) -> None:
        """The feeder: jobs from the inbox into the queue, all that have come at each turn of
        the lock; None (from close) ends it, once everything before it is queued."""
        while True:
            jobs = [self._inbox.get()]
            while True:
                try:
                    jobs.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            with self._work:
                for job in jobs:
                    if job is not None:
                        self._queue.add(job)
                self._work.notify_all()
            if None in jobs:
                return

    def healthy(self) -> bool:
        """Every forward worker alive, and the engine not failing pass after pass."""
        return (all(thread.is_alive() for thread in (*self._threads, self._feeder))
                and self.failures_in_a_row < self.UNHEALTHY_AFTER_FAILURES)

    def close(self) -> None:
        """Finish what was submitted, then stop the workers."""
        self._inbox.put(None)
        self._feeder.join()  # everything submitted is in the queue
        with self._work:
            self._closing = True
            self._work.notify_all()
        for thread in self._threads:
            thread.join()

    # ------------------------------------------------------------------ forward workers

    def _worker(self, number: int) -> None:
        engine = self.engine
        share = max(1, engine.threads // self.workers)
        engine.init_forward_threads(share)
        while (taken := self._next_batch(number)) is not None:
            batch, alone = taken
            if self.on_leave is not None:
                self.on_leave(len(batch))
            # Worker 0 alone with the last batch queued: use every core (the latency case).
            # Only worker 0 ever does, so the process has one OpenMP team at most.
            wide = alone and number == 0 and share < engine.threads
            if wide:
                engine.set_forward_threads(engine.threads)
            try:
                self._run(batch, number)
            except Exception:  # a bug, not bad input (_run answers those): keep the worker alive
                log.exception("forward worker %d: a batch of %d texts failed", number, len(batch))
            finally:
                if wide:
                    engine.set_forward_threads(share)

    def _next_batch(self, number: int) -> tuple[list[_Item], bool] | None:
        """Wait for work and cut the next batch; also say whether this worker is alone: nothing
        left queued and every other worker idle. None: closing and nothing left. Worker 0
        takes work first (only it may use every core); the others take what it leaves."""
        with self._work:
            self._idle[number] = True
            while not self._queue.waiting or (number and self._idle[0]):
                if self._closing and not self._queue.waiting:
                    return None
                self._work.wait()
            self._idle[number] = False
            batch = self._queue.cut()
            if self._queue.waiting or self._closing:
                # More for the other workers; or, closing, the pool may just have emptied: a
                # worker that waits for worker 0 must wake to see it and stop.
                self._work.notify_all()
            return batch, not self._queue.waiting and sum(self._idle) == self.workers - 1

    def _run(self, batch: list[_Item], number: int) -> None:
        metrics = self.metrics
        start = time.perf_counter_ns()
        metrics.queue_depth.dec(len(batch))
        batch = [item for item in batch if not item.job.cancelled]  # their callers have gone
        if not batch:
            return
        for item in batch:
            metrics.queue_wait.observe((start - item.job.enqueued_ns) / 1e9)
        metrics.batch_rows.observe(len(batch))
        metrics.batch_tokens.observe(len(batch) * batch[-1].length)  # sorted: last is longest
        for part, hidden, lengths in self._forward_splitting(batch):
            self._complete(part, hidden, lengths, start, number)
            del hidden  # free the layers before the next part

    def _forward_splitting(self, batch: list[_Item]):
        """Run the forward pass; if it fails (out of memory on a big batch, say), retry each half,
        down to single texts. Yields (texts, hidden states, lengths); for a text that fails on its
        own, the exception in place of the hidden states. The server lives on either way."""
        try:
            started = time.perf_counter()
            hidden, lengths = self.engine.forward([item.job.ids[item.index] for item in batch])
            self.metrics.forward_seconds.observe(time.perf_counter() - started)
            self.failures_in_a_row = 0
        except Exception as exc:
            self.failures_in_a_row += 1
            self.engine.free_cache()
            if len(batch) == 1:
                log.error("forward pass failed on one text", exc_info=exc)
                yield batch, exc, None
                return
            log.warning("forward pass failed on %d texts (%s: %s); retrying in halves",
                        len(batch), type(exc).__name__, exc)
            middle = len(batch) // 2
            yield from self._forward_splitting(batch[:middle])
            yield from self._forward_splitting(batch[middle:])
            return
        yield batch, hidden, lengths

    def _complete(self, batch: list[_Item], hidden, lengths: np.ndarray, start: int,
                  number: int) -> None:
        """Pool a forwarded batch and settle the jobs whose last text it held."""
        try:
            if isinstance(hidden, Exception):
                raise hidden
            pooled = self._pool_batch(batch, hidden, lengths)
            error = None
        except Exception as exc:
            if hidden is not exc:  # forward failures were logged where they happened
                log.exception("pooling failed on a batch of %d texts", len(batch))
            which = f"texts[{batch[0].index}]: " if len(batch) == 1 else ""
            error = EmbedError(ErrorKind.INTERNAL, f"{which}computing embeddings failed: "
                                                   f"{type(exc).__name__}: {exc}")
            pooled = [None] * len(batch)
        elapsed = time.perf_counter_ns() - start
        failed, finished = [], []
        with self._settling:
            for job in {item.job for item in batch}:
                job.usage.queue_ns = max(job.usage.queue_ns, start - job.enqueued_ns)
                job.usage.compute_ns += elapsed
            for item, vectors in zip(batch, pooled):
                job = item.job
                if error is not None and not job._failed:
                    job._failed = True
                    failed.append(job)
                job._rows[item.index] = vectors
                job._remaining -= 1
                if not job._remaining and not job._failed:
                    finished.append(job)
        # This worker is as good as idle. Worker 0: the next call, sent once this one is
        # answered, must wait for it (and all the cores), not go to a one-core worker. The
        # others: that next call finds every other worker idle and gets all the cores (a lone
        # batch), instead of one core because this worker had not yet gone back to wait. Under
        # the lock, and told: a worker that checked _idle a moment ago is waiting on it (close()
        # too).
        with self._work:
            self._idle[number] = True
            self._work.notify_all()
        for job in failed:
            job.on_done(error)
        for job in finished:  # every text is in: no other worker touches this job again
            try:
                job.on_done(self._finish(job))
            except Exception as exc:  # packing failed: still answer the caller
                log.exception("finishing a job failed")
                job.on_done(EmbedError(ErrorKind.INTERNAL, f"packing embeddings failed: {exc}"))

    def _pool_batch(self, batch: list[_Item], hidden, lengths: np.ndarray) -> list:
        """Each text's vector (or for pooling "none", its token vectors), in batch order."""
        by_options: dict[EmbedOptions, list[int]] = {}
        for row, item in enumerate(batch):
            by_options.setdefault(item.job.options, []).append(row)
        pooled = [None] * len(batch)
        for options, rows in by_options.items():
            rows = np.asarray(rows)
            vectors = self.engine.pool(hidden, lengths, rows, options)
            if options.token_level:
                ends = np.cumsum(lengths[rows])
                for row, start, end in zip(rows, ends - lengths[rows], ends):
                    pooled[row] = vectors[start:end]
            else:
                for row, vector in zip(rows, vectors):
                    pooled[row] = vector
        return pooled

    @staticmethod
    def _finish(job: Job) -> JobResult:
        rows = [job._rows[i] for i in range(len(job.ids))]
        job._rows.clear()
        if job.options.token_level:
            vectors = np.concatenate(rows)
            lengths = [len(r) for r in rows]
        else:
            vectors, lengths = np.stack(rows), None
        return JobResult(pack(vectors, job.dtype), lengths, job.usage)
