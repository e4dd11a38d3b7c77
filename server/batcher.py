"""One scheduler for every served model: two lanes, batches by token budget, forward passes side
by side.

Everything queued waits in a Queue (text_queue.py) of its lane and its model, sorted by length:
interactive work (a caller waiting on the answer) and bulk work (corpus jobs). A worker takes its
next batch from the interactive lane while it has work, but for every interactive_per_bulk batches
cut while bulk work waits, one goes to bulk (Limits.bulk_share), so bulk fills what is left and
never starves; an interactive call waits at most for a batch already running. Within a lane the
models with work take turns, a batch each (a batch holds one model's texts, padded to its own
longest): no model waits behind another's backlog for more than a batch per other model, and no
worker idles while any model has work. Within a lane and model (Queue.cut):
callers take turns, each cut serving the oldest message of the caller
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

import logging
import queue
import threading
import time
import traceback
from typing import Callable, Sequence

import numpy as np

from .engine import EmbedOptions, Engine
from .errors import EmbedError, ErrorKind
from .jobs import BULK, INTERACTIVE, LANES, Job
from .metrics import Metrics
from .text_queue import Batch, Queue
from .threads import name_os_thread

log = logging.getLogger("bertstream.batcher")


class Batcher:
    # This many forward passes failing in a row (nothing succeeding between them) marks the
    # engine unhealthy: the health service then says NOT_SERVING.
    UNHEALTHY_AFTER_FAILURES = 5
    # An interactive call waits for a bulk batch already running (a pass cannot be cut short).
    # So while interactive calls come (one in the last few seconds), bulk batches are cut at
    # three quarters of the budget: interactive p99 199 -> 146-149 ms here, the stream beside
    # the calls at 0.90-0.96x its pace alone. At half the budget p99 fell to 116-121 ms but the
    # stream to 0.84-0.90x: each shorter wait gathers fewer calls into one pass, so more passes
    # (BENCHMARKS.md, "Two lanes").
    BULK_BESIDE_INTERACTIVE = 0.75
    INTERACTIVE_RECENT_S = 5.0

    def __init__(self, engines: Engine | Sequence[Engine], max_batch_tokens: int,
                 metrics: Metrics | None = None,
                 on_leave: Callable[[str, int], None] | None = None, bulk_share: float = 0.2):
        """engines: the served models (a job names its own; the first takes jobs naming none).
        They share the forward workers, whose count and threads the first one's settings give.
        on_leave(lane, n): n texts of that lane left the queue (taken into a forward pass, or
        dropped because their caller went away); called on a forward worker's thread.
        bulk_share: the share of forward passes bulk gets at least while both lanes have work."""
        if not 0 < bulk_share <= 0.5:
            raise ValueError(f"bulk_share must be in (0, 0.5], got {bulk_share}")
        self.engines = list(engines) if isinstance(engines, (list, tuple)) else [engines]
        self.engine = self.engines[0]
        self.max_batch_tokens = max_batch_tokens
        self.metrics = metrics or Metrics()
        self.on_leave = on_leave
        # per model: forward passes failing in a row, nothing of that model succeeding between
        self.failures_in_a_row = {engine: 0 for engine in self.engines}
        self.workers = self.engine.forward_workers
        # at least bulk_share: one bulk batch after this many interactive ones, rounded down
        self.interactive_per_bulk = int((1 - bulk_share) / bulk_share + 1e-9)
        # guarded by _work: lane -> model -> its queue; and the model each lane served last
        self._lanes = {lane: {engine: Queue(max_batch_tokens, engine.forward_flops,
                                            engine.free_padding_flops)
                              for engine in self.engines}
                       for lane in LANES}
        self._last_served = {lane: 0 for lane in LANES}
        self._interactive_in_a_row = 0  # batches cut from interactive while bulk waited
        self._interactive_at = -float("inf")  # time.monotonic() of the last interactive job
        self._work = threading.Condition()
        # Guarded by _work. Idle from the start: a worker not yet in its loop runs no batch (so
        # worker 1, up first, still leaves the first batch to worker 0).
        self._idle = [True] * self.workers
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
        if not job.ids.lengths.all():  # no pass can take it: the queue would divide by it
            raise ValueError("a text of no tokens cannot be queued (Core refuses it first)")
        if job.engine is None:
            job.engine = self.engine
        if job.lane == INTERACTIVE:
            self._interactive_at = time.monotonic()  # one float: no lock needed
        self.metrics.queue_depth.inc(len(job.ids))
        self.metrics.lane_queue_texts.labels(job.lane).inc(len(job.ids))
        if self._work.acquire(blocking=False):  # the usual case: no thread hop, no wake-up
            try:
                self._queue_of(job).add(job)
                self._work.notify_all()
            finally:
                self._work.release()
        else:
            self._inbox.put(job)

    def _feed(self) -> None:
        """The feeder: jobs from the inbox into the queue, all that have come at each turn of
        the lock; None (from close) ends it, once everything before it is queued."""
        name_os_thread()
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
                        self._queue_of(job).add(job)
                self._work.notify_all()
            if None in jobs:
                return

    def _queue_of(self, job: Job) -> Queue:
        return self._lanes[job.lane][job.engine]

    def healthy(self, engine: Engine | None = None) -> bool:
        """Every forward worker alive, and no model (or that one) failing pass after pass."""
        failing = self.failures_in_a_row.values() if engine is None \
            else (self.failures_in_a_row[engine],)
        return (all(thread.is_alive() for thread in (*self._threads, self._feeder))
                and max(failing) < self.UNHEALTHY_AFTER_FAILURES)

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
        name_os_thread()
        engine = self.engine
        share = max(1, engine.threads // self.workers)
        engine.init_forward_threads(share)
        while (taken := self._next_batch(number)) is not None:
            batch, alone = taken
            if self.on_leave is not None:
                self.on_leave(batch.jobs[0].lane, len(batch))  # a batch holds one lane
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

    def _next_batch(self, number: int) -> tuple[Batch, bool] | None:
        """Wait for work and cut the next batch; also say whether this worker is alone: nothing
        left queued and every other worker idle. None: closing and nothing left. Worker 0
        takes work first (only it may use every core); the others take what it leaves."""
        with self._work:
            self._idle[number] = True
            while not self.waiting or (number and self._idle[0]):
                if self._closing and not self.waiting:
                    return None
                self._work.wait()
            self._idle[number] = False
            lane = self._next_lane()
            batch = self._next_queue(lane).cut(self._bulk_budget() if lane == BULK else None)
            self.metrics.lane_queue_texts.labels(lane).dec(len(batch))
            self.metrics.lane_batches.labels(lane).inc()
            if self.waiting or self._closing:
                # More for the other workers; or, closing, the queue may just have emptied: a
                # worker that waits for worker 0 must wake to see it and stop.
                self._work.notify_all()
            return batch, not self.waiting and sum(self._idle) == self.workers - 1

    @property
    def waiting(self) -> int:
        """Texts queued in both lanes (read under _work)."""
        return sum(self._waiting(lane) for lane in LANES)

    def _waiting(self, lane: str) -> int:
        return sum(queue.waiting for queue in self._lanes[lane].values())

    def _next_lane(self) -> str:
        """Interactive while it has work, but bulk after interactive_per_bulk interactive cuts
        in a row that it waited through (fewer while bulk batches are cut smaller, so that bulk
        keeps its share of the tokens computed, not only of the passes)."""
        interactive, bulk = self._waiting(INTERACTIVE), self._waiting(BULK)
        per_bulk = self.interactive_per_bulk
        if self._bulk_budget() is not None:
            per_bulk = max(1, int(per_bulk * self.BULK_BESIDE_INTERACTIVE))
        if bulk and (not interactive or self._interactive_in_a_row >= per_bulk):
            self._interactive_in_a_row = 0
            return BULK
        if bulk:
            self._interactive_in_a_row += 1
        return INTERACTIVE

    def _bulk_budget(self) -> int | None:
        """A bulk batch's token budget: smaller while interactive calls come, else the whole."""
        if time.monotonic() - self._interactive_at < self.INTERACTIVE_RECENT_S:
            return max(1, int(self.max_batch_tokens * self.BULK_BESIDE_INTERACTIVE))
        return None

    def _next_queue(self, lane: str) -> Queue:
        """The lane's next model with work, after the one it served last (turns)."""
        queues = list(self._lanes[lane].values())
        for step in range(1, len(queues) + 1):
            turn = (self._last_served[lane] + step) % len(queues)
            if queues[turn].waiting:
                self._last_served[lane] = turn
                return queues[turn]
        raise AssertionError(f"no work in the {lane} lane")  # the caller checked there is

    def _run(self, batch: Batch, number: int) -> None:
        metrics = self.metrics
        start = time.perf_counter_ns()
        metrics.queue_depth.dec(len(batch))
        batch = batch.without_cancelled()  # their callers have gone
        if not len(batch):
            return
        # How long the batch's longest-waiting text waited: an observation per forward pass,
        # not per text (two a text were a quarter of a forward worker's time when the forward
        # pass costs nothing: benchmarks/host_path.py).
        waited = (start - min(job.enqueued_ns for job in batch.jobs)) / 1e9
        metrics.queue_wait.observe(waited)
        metrics.lane_queue_wait.labels(batch.jobs[0].lane).observe(waited)
        engine = batch.jobs[0].engine  # a batch holds one model's texts
        for part, hidden, lengths in self._forward_splitting(engine, batch):
            self._complete(part, hidden, lengths, start, number)
            del hidden  # free the layers before the next part

    def _forward_splitting(self, engine: Engine, batch: Batch):
        """Run the forward pass; if it fails (out of memory on a big batch, say), retry each half,
        down to single texts. Yields (texts, hidden states, lengths); for a text that fails on its
        own, the exception in place of the hidden states. The server lives on either way."""
        failed = None
        try:
            started = time.perf_counter()
            if batch.jobs[0].type_ids is None:
                hidden, lengths = engine.forward(batch.gather("ids"))
            else:  # a cross-encoder's pairs: their segment ids too
                hidden, lengths = engine.forward(batch.gather("ids"), batch.gather("type_ids"))
            self.metrics.forward_seconds.labels(engine.name).observe(time.perf_counter() - started)
            self._count_pass(engine, batch)
            self.failures_in_a_row[engine] = 0
        except Exception as exc:
            failed = exc
            # Its traceback holds the failed pass's frames, and so their tensors (a GPU's
            # activations): cleared, and out of the except block, they are freed before the
            # halves run, instead of each half running beside the memory that ran out.
            traceback.clear_frames(exc.__traceback__)
        if failed is None:
            yield batch, hidden, lengths
            return
        self.failures_in_a_row[engine] += 1
        engine.free_cache()
        if len(batch) == 1:
            log.error("forward pass failed on one text", exc_info=failed)
            yield batch, failed, None
            return
        log.warning("forward pass failed on %d texts (%s: %s); retrying in halves",
                    len(batch), type(failed).__name__, failed)
        del failed
        middle = len(batch) // 2
        yield from self._forward_splitting(engine, batch[:middle])
        yield from self._forward_splitting(engine, batch[middle:])

    def _count_pass(self, engine: Engine, batch: Batch) -> None:
        """A pass that ran, in the metrics: its rows, tokens real and padded, FLOPs (a failed
        pass retried in halves counts the halves that ran, not the batch that did not)."""
        metrics, model = self.metrics, engine.name
        rows, longest, real = len(batch), batch.longest, batch.tokens
        metrics.batch_rows.labels(model).observe(rows)
        metrics.batch_tokens.labels(model).observe(rows * longest)
        metrics.padded_tokens.labels(model).inc(rows * longest)
        metrics.real_tokens.labels(model).inc(real)
        metrics.forward_flops.labels(model).inc(engine.forward_flops(rows, longest, real))

    def _complete(self, batch: Batch, hidden, lengths: np.ndarray, start: int,
                  number: int) -> None:
        """Pool a forwarded batch and settle the jobs whose last text it held."""
        parts = batch.parts()
        try:
            if isinstance(hidden, Exception):
                raise hidden
            pooled = self._pool_batch(batch.jobs[0].engine, len(batch), parts, hidden, lengths)
            error = None
        except Exception as exc:
            if hidden is not exc:  # forward failures were logged where they happened
                log.exception("pooling failed on a batch of %d texts", len(batch))
            which = f"texts[{batch.index[0]}]: " if len(batch) == 1 else ""
            error = EmbedError(ErrorKind.INTERNAL, f"{which}computing embeddings failed: "
                                                   f"{type(exc).__name__}: {exc}")
            pooled = [None] * len(parts)
        elapsed = time.perf_counter_ns() - start
        failed, finished = [], []
        with self._settling:
            for (job, indices, _), output in zip(parts, pooled):
                job.timed(start, elapsed)
                if error is not None:
                    if job.fail():
                        failed.append(job)
                elif job.fill(indices, output):
                    finished.append(job)
        # This worker is as good as idle. Worker 0: the next call, sent once this one is
        # answered, must wait for it (and all the cores), not go to a one-core worker. The
        # others: that next call finds every other worker idle and gets all the cores (a lone
        # batch), instead of one core because this worker had not yet gone back to wait. No
        # waiting worker is told: none waits for a worker to go idle (workers after 0 wait
        # while worker 0 is idle, and are told when it takes a batch and work is left, or when
        # the queue empties while closing; close() waits only for the threads), and waking
        # them after every pass cost each pass a thread's wake-up.
        with self._work:
            self._idle[number] = True
        for job in failed:
            job.on_done(error)
        for job in finished:  # every text is in: no other worker touches this job again
            try:
                job.on_done(job.result())
            except Exception as exc:  # packing failed: still answer the caller
                log.exception("finishing a job failed")
                job.on_done(EmbedError(ErrorKind.INTERNAL, f"packing embeddings failed: {exc}"))

    def _pool_batch(self, engine: Engine, rows: int, parts: list, hidden,
                    lengths: np.ndarray) -> list:
        """Each part's output, in order, as Job.fill takes it: its texts' vectors, one row each;
        or a list, per text, of its token vectors (pooling "none") or its sparse vector. The
        parts asking alike are pooled together (usually all: the batch's rows as they are)."""
        by_options: dict[EmbedOptions, list[int]] = {}
        for number, (job, _, _) in enumerate(parts):
            by_options.setdefault(job.options, []).append(number)
        pooled = [None] * len(parts)
        for options, numbers in by_options.items():
            if len(numbers) == len(parts):  # the common case: no rows picked, none copied
                chosen, where = np.arange(rows), None
            else:
                chosen = np.sort(np.concatenate([parts[p][2] for p in numbers]))
                where = np.empty(rows, dtype=np.int64)  # batch row -> its row of the output
                where[chosen] = np.arange(len(chosen))
            output = engine.pool(hidden, lengths, chosen, options)
            if options.token_level:  # the rows' tokens back to back: one array per text
                ends = np.cumsum(lengths[chosen]).tolist()
                output = [output[start:end] for start, end in zip([0, *ends], ends)]
            for p in numbers:
                at = parts[p][2] if where is None else where[parts[p][2]]
                pooled[p] = output[at] if isinstance(output, np.ndarray) \
                    else [output[i] for i in at.tolist()]
        return pooled

