"""One queue for every caller; batches by token budget; forward passes run side by side.

Everything queued waits in one pool kept sorted by length. Forward workers (threads) each take the
next batch: the pool is cut into runs that fit the token budget (rows x longest), greedily from
the shortest as an offline loop over sorted texts would, and a worker takes the run that holds the
oldest text of the caller served least recently. Callers take turns and each one's oldest text
goes first, so none starves; the whole backlog is sorted, so little is padded. A worker pools and packs its own batch, and settles the jobs whose last text it
held.

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
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from bertstream import ext
from bertstream.server.engine import EmbedOptions, Engine
from bertstream.server.errors import EmbedError, ErrorKind
from bertstream.server.metrics import Metrics

log = logging.getLogger("bertstream.batcher")

@dataclass
class Usage:
    tokens: int = 0
    truncated_items: int = 0
    queue_ns: int = 0
    compute_ns: int = 0


@dataclass
class Packed:
    """A result tensor in its wire dtype: little-endian bytes, logical shape, int8 scales."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes
    scales: np.ndarray | None = None


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


def pack(vectors: np.ndarray, dtype: str) -> Packed:
    """float32 vectors -> wire bytes in `dtype` (the ext kernels do the conversion)."""
    shape = tuple(vectors.shape)
    if dtype == "float32":
        return Packed(dtype, shape, vectors.astype("<f4", copy=False).tobytes())
    if dtype == "float16":
        return Packed(dtype, shape, ext.pack_float16(vectors).tobytes())
    if dtype == "bfloat16":
        return Packed(dtype, shape, ext.pack_bfloat16(vectors).astype("<u2", copy=False).tobytes())
    if dtype == "int8":
        q, scales = ext.pack_int8(vectors)
        return Packed(dtype, shape, q.tobytes(), scales)
    if dtype == "binary":
        return Packed(dtype, shape, ext.pack_binary(vectors).tobytes())
    raise ValueError(f"unknown wire dtype {dtype!r}")


@dataclass
class _Item:
    job: Job
    index: int
    length: int
    arrival: int  # order of arrival: the smallest is the oldest


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
        self._pool: list[_Item] = []  # sorted by length; guarded by _work
        self._work = threading.Condition()
        self._idle = [False] * self.workers  # guarded by _work
        self._closing = False
        self._arrivals = itertools.count()
        self._cuts = 0  # batches cut so far
        self._served: dict[object, int] = {}  # caller in the pool -> the cut that last served it
        self._settling = threading.Lock()  # a job's texts may be in batches of several workers
        self._threads = [threading.Thread(target=self._worker, args=(number,), daemon=True,
                                          name=f"bertstream-forward-{number}")
                         for number in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        if not job.ids:
            raise ValueError("a job needs at least one text")
        self.metrics.queue_depth.inc(len(job.ids))
        with self._work:
            for index, ids in enumerate(job.ids):
                item = _Item(job, index, len(ids), next(self._arrivals))
                bisect.insort(self._pool, item, key=lambda it: it.length)
            self._work.notify_all()

    def healthy(self) -> bool:
        """Every forward worker alive, and the engine not failing pass after pass."""
        return (all(thread.is_alive() for thread in self._threads)
                and self.failures_in_a_row < self.UNHEALTHY_AFTER_FAILURES)

    def close(self) -> None:
        """Finish what was submitted, then stop the workers."""
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
            while not self._pool or (number and self._idle[0]):
                if self._closing and not self._pool:
                    return None
                self._work.wait()
            self._idle[number] = False
            batch = self._cut_batch()
            if self._pool or self._closing:
                # More for the other workers; or, closing, the pool may just have emptied: a
                # worker that waits for worker 0 must wake to see it and stop.
                self._work.notify_all()
            return batch, not self._pool and sum(self._idle) == self.workers - 1

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

    def _cut_batch(self) -> list[_Item]:
        """Cut the length-sorted pool into consecutive runs that fit the budget, greedily from
        the shortest (as an offline loop over a sorted corpus would), and take the run holding
        the oldest text of the caller served least recently. With a full pool these are the
        offline batches. Callers take turns: one stream's backlog of long texts delays another
        caller's request by one batch, not by the whole backlog; within a caller, oldest first."""
        pool, budget = self._pool, self.max_batch_tokens
        oldest_of: dict[object, int] = {}  # caller -> pool index of its oldest text
        for index, item in enumerate(pool):
            caller = item.job.caller or item.job
            known = oldest_of.get(caller)
            if known is None or item.arrival < pool[known].arrival:
                oldest_of[caller] = index
        self._served = {caller: self._served.get(caller, -1) for caller in oldest_of}
        turn = min(oldest_of, key=lambda c: (self._served[c], pool[oldest_of[c]].arrival))
        self._cuts += 1
        self._served[turn] = self._cuts
        oldest = oldest_of[turn]
        low = 0
        for high in range(1, len(pool) + 1):
            # Sorted ascending: adding pool[high] makes it the longest of the run.
            if high == len(pool) or (high - low + 1) * pool[high].length > budget:
                if high > oldest:
                    break
                low = high
        batch = pool[low:high]
        del pool[low:high]
        return batch

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
        if number == 0:
            # Worker 0 is as good as idle: the next call, sent once this one is answered, must
            # wait for it (and all the cores), not go to a one-core worker. Under the lock, and
            # told: a worker that checked _idle[0] a moment ago is waiting on it (close() too).
            with self._work:
                self._idle[0] = True
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
