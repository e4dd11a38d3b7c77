"""The batcher's forward workers: texts of one job spread over several workers come back whole and
in order, and the thread policy (one core per worker under load, every core for a lone batch)."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import torch

from bertstream.server.batcher import Batcher, Job


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


def submit(batcher, engine, texts) -> Future:
    done = Future()
    options = engine.options("mean", (), "concat", False)
    batcher.submit(Job(engine.tokenize(texts).ids, options, "float32", done.set_result))
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
