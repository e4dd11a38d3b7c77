"""One queue for every caller; batches by token budget; forward pass and pooling overlapped.

Two threads own the work:
  forward thread   moves everything queued into a pool kept sorted by length, cuts the pool into
                   runs that fit the token budget (rows x longest), and runs the forward pass on
                   the run that holds the oldest text. Every batch holds the oldest text, so none
                   starves; the whole backlog is sorted, so little is padded.
  pooling thread   pools and packs a finished batch while the next forward pass runs, and completes
                   the jobs whose last text it held.
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
    """One request's texts on their way through the batcher. Touched by one thread at a time:
    the forward thread reads ids/cancelled, the pooling thread fills the outputs."""

    ids: list[list[int]]
    options: EmbedOptions
    dtype: str
    on_done: Callable[[JobResult | EmbedError], None]
    truncated_items: int = 0
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
    def __init__(self, engine: Engine, max_batch_tokens: int, metrics: Metrics | None = None):
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.metrics = metrics or Metrics()
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._pool: list[_Item] = []  # sorted by length; only the forward thread touches it
        self._arrivals = itertools.count()
        self._closing = False
        self._forwarded: queue.Queue = queue.Queue(maxsize=2)  # bounded: forward runs <= 2 ahead
        self._threads = [
            threading.Thread(target=self._forward_loop, name="bertstream-forward", daemon=True),
            threading.Thread(target=self._pool_loop, name="bertstream-pool", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        if not job.ids:
            raise ValueError("a job needs at least one text")
        self.metrics.queue_depth.inc(len(job.ids))
        self._jobs.put(job)

    def close(self) -> None:
        """Finish what was submitted, then stop both threads."""
        self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    # ------------------------------------------------------------------ forward thread

    def _admit(self, job: Job | None) -> None:
        if job is None:
            self._closing = True  # close(): finish the pool, then stop
            return
        for index, ids in enumerate(job.ids):
            item = _Item(job, index, len(ids), next(self._arrivals))
            bisect.insort(self._pool, item, key=lambda it: it.length)

    def _next_batch(self) -> list[_Item] | None:
        """Wait for work, admit everything queued, and cut the next batch out of the pool."""
        while True:
            if not self._pool and not self._closing:
                self._admit(self._jobs.get())
            while True:  # everything queued joins the pool, so the sort sees the whole backlog
                try:
                    self._admit(self._jobs.get_nowait())
                except queue.Empty:
                    break
            if self._pool:
                return self._cut_batch()
            if self._closing:
                return None

    def _cut_batch(self) -> list[_Item]:
        """Cut the length-sorted pool into consecutive runs that fit the budget, greedily from
        the shortest (as an offline loop over a sorted corpus would), and take the run holding
        the oldest text. With a full pool these are the offline batches, served oldest first."""
        pool, budget = self._pool, self.max_batch_tokens
        oldest = min(range(len(pool)), key=lambda i: pool[i].arrival)
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

    def _forward_loop(self):
        self.engine.claim_forward_thread()
        metrics = self.metrics
        while (batch := self._next_batch()) is not None:
            start = time.perf_counter_ns()
            metrics.queue_depth.dec(len(batch))
            batch = [item for item in batch if not item.job.cancelled]  # their callers have gone
            if not batch:
                continue
            for item in batch:
                metrics.queue_wait.observe((start - item.job.enqueued_ns) / 1e9)
            metrics.batch_rows.observe(len(batch))
            metrics.batch_tokens.observe(len(batch) * batch[-1].length)  # sorted: last is longest
            for part, hidden, lengths in self._forward_splitting(batch):
                if self._pooling_thread_idle() and not self._pool and self._jobs.empty():
                    # Nothing waits for the next forward pass: pool here, and save the caller
                    # a wake-up of the pooling thread (unary latency).
                    self._complete(part, hidden, lengths, start)
                else:
                    self._forwarded.put((part, hidden, lengths, start))
        self._forwarded.put(None)

    def _pooling_thread_idle(self) -> bool:
        # Only this thread puts work there, so once the pooling thread has finished all of it, it
        # stays idle until this thread puts more: the jobs it touched are ours to touch.
        return self._forwarded.unfinished_tasks == 0

    def _forward_splitting(self, batch: list[_Item]):
        """Run the forward pass; if it fails (out of memory on a big batch, say), retry each half,
        down to single texts. Yields (texts, hidden states, lengths); for a text that fails on its
        own, the exception in place of the hidden states. The server lives on either way."""
        try:
            started = time.perf_counter()
            hidden, lengths = self.engine.forward([item.job.ids[item.index] for item in batch])
            self.metrics.forward_seconds.observe(time.perf_counter() - started)
        except Exception as exc:
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

    # ------------------------------------------------------------------ pooling thread

    def _pool_loop(self):
        while (work := self._forwarded.get()) is not None:
            self._complete(*work)
            del work  # free the layers before the next batch arrives
            self._forwarded.task_done()

    def _complete(self, batch: list[_Item], hidden, lengths: np.ndarray, start: int) -> None:
        """Pool a forwarded batch and settle the jobs whose last text it held."""
        try:
            if isinstance(hidden, Exception):
                raise hidden
            self._pool_batch(batch, hidden, lengths)
            error = None
        except Exception as exc:
            if hidden is not exc:  # forward failures were logged where they happened
                log.exception("pooling failed on a batch of %d texts", len(batch))
            which = f"texts[{batch[0].index}]: " if len(batch) == 1 else ""
            error = EmbedError(ErrorKind.INTERNAL, f"{which}computing embeddings failed: "
                                                   f"{type(exc).__name__}: {exc}")
        elapsed = time.perf_counter_ns() - start
        for job in {item.job for item in batch}:
            job.usage.queue_ns = max(job.usage.queue_ns, start - job.enqueued_ns)
            job.usage.compute_ns += elapsed
        for item in batch:
            self._text_done(item, error)

    def _pool_batch(self, batch: list[_Item], hidden, lengths: np.ndarray) -> None:
        by_options: dict[EmbedOptions, list[int]] = {}
        for row, item in enumerate(batch):
            by_options.setdefault(item.job.options, []).append(row)
        for options, rows in by_options.items():
            rows = np.asarray(rows)
            vectors = self.engine.pool(hidden, lengths, rows, options)
            if options.pooling == "none":
                ends = np.cumsum(lengths[rows])
                for row, start, end in zip(rows, ends - lengths[rows], ends):
                    item = batch[row]
                    item.job._rows[item.index] = vectors[start:end]
            else:
                for row, vector in zip(rows, vectors):
                    item = batch[row]
                    item.job._rows[item.index] = vector

    def _text_done(self, item: _Item, error: EmbedError | None) -> None:
        job = item.job
        if error is not None and not job._failed:
            job._failed = True
            job.on_done(error)
        job._remaining -= 1
        if job._remaining or job._failed:
            return
        try:
            job.on_done(self._finish(job))
        except Exception as exc:  # packing failed: still answer the caller
            log.exception("finishing a job failed")
            job.on_done(EmbedError(ErrorKind.INTERNAL, f"packing embeddings failed: {exc}"))

    @staticmethod
    def _finish(job: Job) -> JobResult:
        rows = [job._rows[i] for i in range(len(job.ids))]
        job._rows.clear()
        if job.options.pooling == "none":
            vectors = np.concatenate(rows)
            lengths = [len(r) for r in rows]
        else:
            vectors, lengths = np.stack(rows), None
        return JobResult(pack(vectors, job.dtype), lengths, job.usage)
