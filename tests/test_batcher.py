"""The batcher's forward workers: texts of one job spread over several workers come back whole and
in order, and the thread policy (one core per worker under load, every core for a lone batch)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from bertstream.server.batcher import Batcher
from bertstream.server.jobs import Job


class RecordingEngine:
    """The real engine, with two workers on two threads, noting who ran each forward pass."""

    def __init__(self, engine):
        self._engine = engine
        self.forward_workers = 2
        self.threads = 2
        self.calls: list[tuple[str, int, int]] = []  # (thread, torch threads, rows)

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def forward(self, ids):
        self.calls.append((threading.current_thread().name, torch.get_num_threads(), len(ids)))
        return self._engine.forward(ids)


def submit(batcher, engine, texts, on_done=None) -> Future:
    done = Future()
    options = engine.options("mean", (), "concat", False)
    batcher.submit(Job(engine.tokenize(texts).ids, options, "float32",
                       on_done or done.set_result))
    return done


def vectors(result) -> np.ndarray:
    packed = result.embeddings
    return np.frombuffer(packed.data, "<f4").reshape(packed.shape)


def alone(engine, text) -> np.ndarray:
    """The text embedded on its own, straight through the engine."""
    ids = engine.tokenize([text]).ids
    hidden, lengths = engine.forward(ids)
    return engine.pool(hidden, lengths, np.arange(1), engine.options("mean", (), "concat", False))


def test_a_job_spread_over_workers_comes_back_whole_and_in_order(engine, corpus):
    recording = RecordingEngine(engine)
    batcher = Batcher(recording, max_batch_tokens=96)  # many small batches
    try:
        jobs = [list(corpus[i:i + 25]) for i in range(0, 75, 25)]
        futures = [submit(batcher, engine, texts) for texts in jobs]
        results = [f.result(timeout=120) for f in futures]
    finally:
        batcher.close()
    workers = {name for name, _, _ in recording.calls}
    assert workers == {"bertstream-forward-0", "bertstream-forward-1"}
    for texts, result in zip(jobs, results):
        got = vectors(result)
        assert got.shape == (len(texts), engine.hidden_size)
        for i in (0, len(texts) // 2, len(texts) - 1):
            np.testing.assert_allclose(got[i], alone(engine, texts[i])[0], atol=1e-4)


def test_one_core_per_worker_under_load_every_core_for_a_lone_batch(engine, corpus):
    recording = RecordingEngine(engine)
    batcher = Batcher(recording, max_batch_tokens=96)
    try:
        submit(batcher, engine, list(corpus[:40])).result(timeout=120)  # a backlog at once
        under_load = list(recording.calls)
        recording.calls.clear()
        submit(batcher, engine, ["one short text on an idle server"]).result(timeout=60)
        lone = list(recording.calls)
    finally:
        batcher.close()
    assert len(under_load) > 4
    assert all(threads == 1 for name, threads, _ in under_load if name != "bertstream-forward-0")
    assert sum(threads == 1 for _, threads, _ in under_load) >= len(under_load) - 1
    assert lone == [("bertstream-forward-0", 2, 1)]


class GatedEngine(RecordingEngine):
    """Forward passes on worker 0 wait for `gate`, so a test can hold worker 0 mid-batch."""

    def __init__(self, engine):
        super().__init__(engine)
        self.gate, self.holding = threading.Event(), threading.Event()

    def forward(self, ids):
        if threading.current_thread().name == "bertstream-forward-0":
            self.holding.set()
            assert self.gate.wait(60)
        return super().forward(ids)


def test_a_workers_first_pass_keeps_one_core_while_worker_0_uses_every_core(engine):
    """Worker 0 runs a lone batch on every core; meanwhile worker 1 runs its very first pass. Torch
    sets a thread's count up lazily, from the count set last (worker 0's 2): worker 1 must still
    compute on its one core."""
    gated = GatedEngine(engine)
    batcher = Batcher(gated, max_batch_tokens=96)
    try:
        lone = submit(batcher, engine, ["a lone text: worker 0 takes every core"])
        assert gated.holding.wait(60)
        second = submit(batcher, engine, ["worker 1's first text"])
        for _ in range(6000):  # worker 1 takes the second text while worker 0 is held
            if any(name == "bertstream-forward-1" for name, _, _ in gated.calls):
                break
            time.sleep(0.01)
        gated.gate.set()
        lone.result(timeout=60), second.result(timeout=60)
    finally:
        gated.gate.set()
        batcher.close()
    assert ("bertstream-forward-0", 2, 1) in gated.calls
    assert ("bertstream-forward-1", 1, 1) in gated.calls


def test_close_returns_when_worker_0_takes_the_last_batch_while_closing(engine):
    """Worker 0 is between batches (answering a job) when a text arrives and close() starts:
    worker 1 waits for worker 0 to take it, and must still see the pool empty and stop."""
    batcher = Batcher(RecordingEngine(engine), max_batch_tokens=96)
    answering, gate = threading.Event(), threading.Event()

    def slow_answer(result):
        answering.set()
        gate.wait(60)

    submit(batcher, engine, ["the first job"], on_done=slow_answer)
    assert answering.wait(60)
    last = submit(batcher, engine, ["the last job"])
    closer = threading.Thread(target=batcher.close)
    closer.start()
    closer.join(0.3)
    gate.set()
    closer.join(30)
    assert not closer.is_alive(), "Batcher.close() hung"
    assert last.result(timeout=5) is not None


def test_a_submission_never_waits_for_the_workers_lock(engine):
    """submit() runs on the event loop: it must not wait while a worker holds the queue's lock
    (cutting a batch at the largest backlog held it 31-58 ms). With the lock held by another
    thread, submissions return at once, and their jobs are computed once it is let go."""
    batcher = Batcher(RecordingEngine(engine), 1024)
    held, release = threading.Event(), threading.Event()

    def worker_cutting():  # another thread, as a forward worker is
        with batcher._work:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=worker_cutting)
    holder.start()
    try:
        held.wait(10)
        started = time.perf_counter()
        futures = [submit(batcher, engine, [f"text {i}"]) for i in range(20)]
        returned = time.perf_counter() - started
        time.sleep(0.5)
        assert not any(f.done() for f in futures)
        release.set()
        assert returned < 0.25, returned
        assert all(f.result(timeout=60).embeddings.shape == (1, 384) for f in futures)
    finally:
        release.set()
        holder.join()
        batcher.close()


class ModelEngine(RecordingEngine):
    """One served model (the real engine under another name); every model's passes go to one
    log, with the ids each pass held."""

    def __init__(self, engine, name, log):
        super().__init__(engine)
        self.name, self.log = name, log

    def forward(self, ids):
        self.log.append((self.name, {tuple(row.tolist()) for row in ids}))
        return self._engine.forward(ids)


def test_models_take_turns_and_a_batch_holds_one_models_texts(engine, corpus):
    """Model a has a backlog of many batches when one text comes for model b: b's pass comes
    after at most the two of a's already cut (one per worker), not after a's backlog; every pass
    holds the texts of its own model only, and each job's vectors are its model's."""
    log = []
    a, b = ModelEngine(engine, "a", log), ModelEngine(engine, "b", log)
    batcher = Batcher([a, b], max_batch_tokens=96)
    options = engine.options("mean", (), "concat", False)
    texts = {"a": list(corpus[:40]), "b": ["one text for the other model"]}
    ids = {name: engine.tokenize(texts[name]).ids for name in texts}
    done = {name: Future() for name in texts}
    try:
        for name, model in (("a", a), ("b", b)):
            batcher.submit(Job(ids[name], options, "float32", done[name].set_result,
                               engine=model))
        results = {name: vectors(done[name].result(timeout=120)) for name in texts}
    finally:
        batcher.close()
    models = [name for name, _ in log]
    assert len(models) > 4 and models.index("b") <= 2, models
    for name, held in log:
        assert held <= {tuple(row.tolist()) for row in ids[name]}, name
    np.testing.assert_allclose(results["b"][0], alone(engine, texts["b"][0])[0], atol=1e-4)
    np.testing.assert_allclose(results["a"][7], alone(engine, texts["a"][7])[0], atol=1e-4)


class TokenEngine(RecordingEngine):
    """Notes each forward pass's padded tokens (rows x longest)."""

    def forward(self, ids):
        self.calls.append(len(ids) * max(len(row) for row in ids))
        return self._engine.forward(ids)


def test_bulk_batches_are_cut_smaller_while_interactive_calls_come(engine, corpus):
    """An interactive call waits for the bulk batch already running: while interactive calls
    come, bulk batches are cut at Batcher.BULK_BESIDE_INTERACTIVE of the budget (a shorter
    wait); with none lately, at the whole."""
    from bertstream.server.jobs import BULK, INTERACTIVE

    recording = TokenEngine(engine)
    batcher = Batcher(recording, max_batch_tokens=256)
    options = engine.options("mean", (), "concat", False)
    ids = [row for row in engine.tokenize(list(corpus[:200])).ids if 10 <= len(row) <= 60][:60]

    def bulk_passes(lane_before: str) -> list[int]:
        """The padded tokens of a bulk job's passes, after one job in lane_before."""
        for lane, job_ids in ((lane_before, ids[:1]), (BULK, ids)):
            done = Future()
            recording.calls.clear()
            batcher.submit(Job(job_ids, options, "float32", done.set_result, lane=lane))
            done.result(timeout=120)
        return list(recording.calls)

    try:
        beside = bulk_passes(INTERACTIVE)
        batcher._interactive_at = -float("inf")  # the last interactive call long ago
        alone = bulk_passes(BULK)
    finally:
        batcher.close()
    smaller = int(256 * Batcher.BULK_BESIDE_INTERACTIVE)
    assert smaller < 256 and max(beside) <= smaller < max(alone) <= 256, (beside, alone)


def test_bulk_keeps_its_share_of_tokens_while_its_batches_are_smaller(engine):
    """bulk_share 0.2: one pass in five goes to bulk while both lanes wait; while bulk batches
    are cut smaller (interactive calls coming), bulk gets more passes, so that it still gets a
    fifth of the tokens computed."""
    from bertstream.server.jobs import BULK

    batcher = Batcher(RecordingEngine(engine), max_batch_tokens=1024, bulk_share=0.2)
    batcher._waiting = lambda lane: 1  # both lanes have work
    try:
        def bulk_passes(interactive_recent: bool) -> int:
            batcher._interactive_at = time.monotonic() if interactive_recent else -float("inf")
            return sum(batcher._next_lane() == BULK for _ in range(60))

        whole, smaller = bulk_passes(False), bulk_passes(True)
    finally:
        del batcher._waiting
        batcher.close()
    size = Batcher.BULK_BESIDE_INTERACTIVE
    assert whole == 12 and smaller > whole
    assert smaller * size / (smaller * size + 60 - smaller) >= 0.2  # bulk's share of the tokens


def test_a_job_whose_texts_were_not_all_computed_fails_loudly(engine):
    """Its vectors are one array filled by batches: a text filled twice and one never (a
    scheduling bug) must not hand the caller a row of whatever memory held."""
    options = engine.options("mean", (), "concat", False)
    job = Job(engine.tokenize(["a", "b", "c"]).ids, options, "float32", lambda result: None)
    vectors = np.ones((2, 384), dtype=np.float32)
    assert not job.fill(np.array([0, 1]), vectors)
    assert job.fill(np.array([1]), vectors[:1])  # the count says whole
    with pytest.raises(RuntimeError, match=r"texts \[2\] were never computed"):
        job.result()
    job = Job(engine.tokenize(["a", "b"]).ids, options, "float32", lambda result: None)
    rows = np.stack([np.full(384, 1.0), np.full(384, 0.0)]).astype(np.float32)
    assert job.fill(np.array([1, 0]), rows)  # batch order is not text order
    assert job.result().embeddings.as_float32()[:, 0].tolist() == [0.0, 1.0]


def test_one_batch_of_jobs_asking_differently_gives_each_its_own_answer(engine, corpus):
    """Four jobs, each asking for other output, cut into one batch: the model's pipeline; CLS,
    not normalized; every token of two layers; 128 dimensions. Each job gets what it asked for,
    for each of its texts in its own order, as the engine computes the text alone."""
    from bertstream.server.text_queue import Queue

    tokens = engine.tokenize(list(corpus[:400]))
    lengths = [len(row) for row in tokens.ids]
    common = max(set(lengths), key=lengths.count)  # texts of one length: no padding between
    texts = [corpus[i] for i, length in enumerate(lengths) if length == common][:8]
    assert len(texts) == 8
    asks = [engine.options(), engine.options("cls", (), "concat", False),
            engine.options("none", (-1, 0), "concat", False), engine.options(dimensions=128)]
    answers, jobs = {}, []
    for number, options in enumerate(asks):
        mine = [texts[number + 4], texts[number]]  # its texts' order is not the batch's
        jobs.append((Job(engine.tokenize(mine).ids, options, "float32",
                         lambda result, n=number: answers.setdefault(n, result),
                         engine=engine), mine, options))
    queue, batcher = Queue(10_000), Batcher([engine], 10_000)  # its own workers stay idle
    try:
        for job, _, _ in jobs:
            queue.add(job)
        batch = queue.cut()
        assert len(batch) == 8 and len({item.job for item in batch}) == 4  # one batch of all
        batcher._run(batch, 0)
    finally:
        batcher.close()
    for number, (job, mine, options) in enumerate(jobs):
        result = answers[number]
        got = result.embeddings.as_float32()
        for text, start, end in zip(mine, *boundaries(result, len(mine))):
            hidden, row_lengths = engine.forward(engine.tokenize([text]).ids)
            expected = engine.pool(hidden, row_lengths, np.arange(1), options)
            assert got[start:end].shape == (len(expected) if options.token_level else 1,
                                            expected.shape[-1])
            assert np.abs(got[start:end] - expected.reshape(got[start:end].shape)).max() <= 1e-5


def boundaries(result, texts: int) -> tuple[list[int], list[int]]:
    """Where each text's rows begin and end in a result (token-level: its tokens)."""
    counts = result.lengths or [1] * texts
    ends = np.cumsum(counts).tolist()
    return [0, *ends[:-1]], ends
