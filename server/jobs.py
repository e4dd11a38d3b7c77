"""One request's texts on their way through the queue and the forward workers, and its answer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .engine import EmbedOptions, Engine
from .errors import EmbedError
from .wire import Packed, pack


# The lanes a job waits in (the proto's Priority labels): interactive first, bulk after.
INTERACTIVE, BULK = "interactive", "bulk"
LANES = (INTERACTIVE, BULK)


@dataclass
class Usage:
    tokens: int = 0
    truncated_items: int = 0
    queue_ns: int = 0
    compute_ns: int = 0


@dataclass
class JobResult:
    embeddings: Packed | None  # None for sparse vectors
    lengths: list[int] | None  # token-level only: tokens per text
    usage: Usage
    sparse: list | None = None  # sparse only: per text, (indices, values)


@dataclass(eq=False)
class Job:
    """One request's texts. They may go through several workers' batches: the workers call
    timed(), fill() and fail() under one lock (the batcher's), and result() once fill() said the
    job is whole."""

    ids: list[list[int]]
    options: EmbedOptions
    dtype: str
    on_done: Callable[[JobResult | EmbedError], None]
    truncated_items: int = 0
    caller: object = None  # whose work this is (a stream's messages share one); None: its own
    sequence: int = 0  # order of the request among its caller's (tokenizing may reorder jobs)
    cancelled: bool = False  # its caller went away: its texts still queued are dropped
    lane: str = INTERACTIVE
    engine: Engine | None = None  # the model that computes it; None: the batcher's first
    type_ids: list | None = None  # a cross-encoder's segment of each token (pairs), per text
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    usage: Usage = field(default_factory=Usage)
    _remaining: int = 0
    _rows: dict = field(default_factory=dict)  # text index -> its vector(s)
    _failed: bool = False

    def __post_init__(self):
        self._remaining = len(self.ids)
        self.usage.tokens = sum(len(ids) for ids in self.ids)
        self.usage.truncated_items = self.truncated_items

    @property
    def who(self) -> object:
        """Whose turn its texts take in the queue: its caller's, or its own."""
        return self.caller or self

    def timed(self, started_ns: int, compute_ns: int) -> None:
        """A batch holding some of its texts started at started_ns and took compute_ns."""
        self.usage.queue_ns = max(self.usage.queue_ns, started_ns - self.enqueued_ns)
        self.usage.compute_ns += compute_ns

    def fill(self, index: int, vectors) -> bool:
        """Text `index`'s vector (or token vectors); True when that was the last one missing
        (and no batch of it failed): the job is whole."""
        self._rows[index] = vectors
        self._remaining -= 1
        return not self._remaining and not self._failed

    def fail(self) -> bool:
        """A batch holding some of its texts failed; True the first time (answer it then)."""
        first, self._failed = not self._failed, True
        return first

    def result(self) -> JobResult:
        """The answer of a whole job, packed in its dtype."""
        rows = [self._rows[i] for i in range(len(self.ids))]
        self._rows.clear()
        if getattr(self.options, "sparse", False):
            return JobResult(None, None, self.usage, sparse=rows)
        if self.options.token_level:
            vectors = np.concatenate(rows)
            lengths = [len(r) for r in rows]
        else:
            vectors, lengths = np.stack(rows), None
        return JobResult(pack(vectors, self.dtype), lengths, self.usage)
