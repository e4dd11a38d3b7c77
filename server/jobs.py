"""One request's texts on their way through the queue and the forward workers, and its answer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .engine import EmbedOptions, Engine
from .errors import EmbedError
from .token_rows import TokenRows
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

    ids: TokenRows  # (or a sequence of id sequences, made TokenRows)
    options: EmbedOptions
    dtype: str
    on_done: Callable[[JobResult | EmbedError], None]
    truncated_items: int = 0
    caller: object = None  # whose work this is (a stream's messages share one); None: its own
    sequence: int = 0  # order of the request among its caller's (tokenizing may reorder jobs)
    cancelled: bool = False  # its caller went away: its texts still queued are dropped
    lane: str = INTERACTIVE
    engine: Engine | None = None  # the model that computes it; None: the batcher's first
    type_ids: TokenRows | None = None  # a cross-encoder's segment of each token (pairs)
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)
    usage: Usage = field(default_factory=Usage)
    _remaining: int = 0
    _vectors: np.ndarray | None = None  # one row per text, filled as batches finish
    _filled: np.ndarray | None = None  # which of those rows are
    _rows: dict = field(default_factory=dict)  # token-level and sparse: text index -> its output
    _failed: bool = False

    def __post_init__(self):
        self.ids = TokenRows.of(self.ids)
        if self.type_ids is not None:
            self.type_ids = TokenRows.of(self.type_ids)
        self._remaining = len(self.ids)
        self.usage.tokens = self.ids.total
        self.usage.truncated_items = self.truncated_items

    @property
    def who(self) -> object:
        """Whose turn its texts take in the queue: its caller's, or its own."""
        return self.caller or self

    @property
    def one_row_each(self) -> bool:
        """Its output is one row of numbers per text (not token-level, not sparse)."""
        return not (self.options.token_level or getattr(self.options, "sparse", False))

    def timed(self, started_ns: int, compute_ns: int) -> None:
        """A batch holding some of its texts started at started_ns and took compute_ns."""
        self.usage.queue_ns = max(self.usage.queue_ns, started_ns - self.enqueued_ns)
        self.usage.compute_ns += compute_ns

    def fill(self, indices: np.ndarray, output) -> bool:
        """The output of texts `indices`: for one_row_each, an array of one row per text; else
        one entry per text (its token vectors, its sparse vector). True when that was the last
        missing (and no batch of it failed): the job is whole."""
        if self.one_row_each:
            if self._vectors is None:
                self._vectors = np.empty((len(self.ids), output.shape[1]), dtype=output.dtype)
                self._filled = np.zeros(len(self.ids), dtype=bool)
            self._vectors[indices] = output
            self._filled[indices] = True
        else:
            self._rows.update(zip(indices.tolist(), output))
        self._remaining -= len(indices)
        return not self._remaining and not self._failed

    def fail(self) -> bool:
        """A batch holding some of its texts failed; True the first time (answer it then)."""
        first, self._failed = not self._failed, True
        return first

    def result(self) -> JobResult:
        """The answer of a whole job, packed in its dtype."""
        if self.one_row_each:
            if not self._filled.all():  # a scheduling bug: loud, not rows of whatever memory held
                raise RuntimeError(f"texts {np.flatnonzero(~self._filled)[:5].tolist()} were "
                                   f"never computed")
            vectors, self._vectors = self._vectors, None
            return JobResult(pack(vectors, self.dtype), None, self.usage)
        rows = [self._rows[i] for i in range(len(self.ids))]
        self._rows.clear()
        if not self.options.token_level:  # sparse
            return JobResult(None, None, self.usage, sparse=rows)
        return JobResult(pack(np.concatenate(rows), self.dtype), [len(r) for r in rows],
                         self.usage)
