"""One queue for every caller; batches by token budget; forward pass and pooling overlapped.

Two threads own the work:
  forward thread   takes a snapshot of everything queued, sorts its texts by length, cuts it into
                   batches whose padded size (rows x longest) fits the token budget, and runs the
                   forward pass on each;
  pooling thread   pools and packs a finished batch while the next forward pass runs, and completes
                   the jobs whose last text it held.
A snapshot is finished before the next is taken, so no text waits behind more than one snapshot.
"""

from __future__ import annotations

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

log = logging.getLogger("bertstream.batcher")

WIRE_DTYPES = ("float32", "float16", "bfloat16", "int8", "binary")


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

    @property
    def length(self) -> int:
        return len(self.job.ids[self.index])


class Batcher:
    def __init__(self, engine: Engine, max_batch_tokens: int, snapshot_batches: int = 8):
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        # A snapshot holds up to this many batches' worth of tokens: more sorts better, fewer
        # bounds how long a newly arrived text waits.
        self.snapshot_tokens = max_batch_tokens * snapshot_batches
        self._jobs: queue.Queue[Job | None] = queue.Queue()
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
        self._jobs.put(job)

    def queued_jobs(self) -> int:
        return self._jobs.qsize()

    def close(self) -> None:
        """Finish what was submitted, then stop both threads."""
        self._jobs.put(None)
        for thread in self._threads:
            thread.join()

    # ------------------------------------------------------------------ forward thread

    def _take_snapshot(self) -> list[_Item] | None:
        job = self._jobs.get()
        if job is None:
            return None
        jobs, tokens = [job], job.usage.tokens
        while tokens < self.snapshot_tokens:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:  # close() after this snapshot
                self._jobs.put(None)
                break
            jobs.append(job)
            tokens += job.usage.tokens
        items = [_Item(job, i) for job in jobs if not job.cancelled for i in range(len(job.ids))]
        items.sort(key=lambda item: item.length)
        return items

    def _batches(self, items: list[_Item]):
        """Consecutive runs of length-sorted items whose padded size fits the token budget."""
        batch: list[_Item] = []
        for item in items:
            # Sorted ascending, so this item is the longest: padded size = rows x its length.
            if batch and (len(batch) + 1) * item.length > self.max_batch_tokens:
                yield batch
                batch = []
            batch.append(item)
        if batch:
            yield batch

    def _forward_loop(self):
        self.engine.claim_forward_thread()
        while (items := self._take_snapshot()) is not None:
            for batch in self._batches(items):
                batch = [item for item in batch if not item.job.cancelled]  # caller has gone
                if not batch:
                    continue
                start = time.perf_counter_ns()
                try:
                    hidden, lengths = self.engine.forward([it.job.ids[it.index] for it in batch])
                except Exception as exc:  # the batch fails, the server lives on
                    log.exception("forward pass failed on a batch of %d texts", len(batch))
                    hidden, lengths = exc, None
                self._forwarded.put((batch, hidden, lengths, start))
        self._forwarded.put(None)

    # ------------------------------------------------------------------ pooling thread

    def _pool_loop(self):
        while (work := self._forwarded.get()) is not None:
            batch, hidden, lengths, start = work
            try:
                if isinstance(hidden, Exception):
                    raise hidden
                self._pool_batch(batch, hidden, lengths)
                error = None
            except Exception as exc:
                if not isinstance(exc, EmbedError):
                    log.exception("pooling failed on a batch of %d texts", len(batch))
                error = exc if isinstance(exc, EmbedError) else EmbedError(
                    ErrorKind.INTERNAL, f"computing embeddings failed: {type(exc).__name__}: {exc}")
            elapsed = time.perf_counter_ns() - start
            del hidden  # free the layers before the next batch arrives
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
