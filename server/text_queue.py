"""The texts waiting for a forward pass, from every caller, and the order batches are cut in."""

from __future__ import annotations

import bisect
from typing import Callable, Iterator, NamedTuple

import numpy as np

from .. import ext
from .jobs import Job
from .token_rows import TokenRows

# The sorted line holds each text as one int, its length above its arrival: sorting and bisecting
# plain ints runs at C speed, where (length, arrival, item) tuples were compared element by
# element (a 64-text message into 100,000 waiting texts: 3.4 ms of the event loop, now 1.0;
# benchmarks/probes/queue_cost.py).
ARRIVAL_BITS = 48  # 2.8e14 texts a queue: 89 years at 100,000 texts a second
ARRIVAL_MASK = (1 << ARRIVAL_BITS) - 1


class Text(NamedTuple):
    """One row of a Batch, for a reader (tests, probes); the hot path reads Batch's arrays."""
    job: Job
    index: int  # its index in its job
    length: int  # tokens


class Batch:
    """A cut batch, its texts sorted by length, as arrays of a row each (not an object a text):
    jobs, each job once; and per row job_of (into jobs), index (the text's in its job) and
    length (tokens)."""

    __slots__ = ("jobs", "job_of", "index", "length", "_grouped", "_parts")

    def __init__(self, jobs: list[Job], job_of: np.ndarray, index: np.ndarray,
                 length: np.ndarray, grouped: tuple[np.ndarray, list[int]] | None = None):
        """grouped: (the rows grouped by job, where each job's end), when known."""
        self.jobs, self.job_of, self.index, self.length = jobs, job_of, index, length
        self._grouped, self._parts = grouped, None

    def __len__(self) -> int:
        return len(self.length)

    def __iter__(self) -> Iterator[Text]:
        jobs = self.jobs
        return (Text(jobs[j], i, n) for j, i, n in zip(self.job_of.tolist(), self.index.tolist(),
                                                        self.length.tolist()))

    def __getitem__(self, rows: slice) -> "Batch":
        return self.keep(np.arange(len(self))[rows])

    def keep(self, rows: np.ndarray) -> "Batch":
        """The batch of these rows (in order)."""
        present, job_of, grouped, ends = ext.group_rows(self.job_of[rows], len(self.jobs))
        return Batch([self.jobs[j] for j in present.tolist()], job_of, self.index[rows],
                     self.length[rows], (grouped, ends.tolist()))

    def without_cancelled(self) -> "Batch":
        """The rows whose callers are still there."""
        gone = [j for j, job in enumerate(self.jobs) if job.cancelled]
        if not gone:
            return self
        return self.keep(np.flatnonzero(~np.isin(self.job_of, gone)))

    @property
    def longest(self) -> int:
        return int(self.length[-1])

    @property
    def tokens(self) -> int:
        """Real tokens (not padding)."""
        return int(self.length.sum())

    def parts(self) -> list[tuple[Job, np.ndarray, np.ndarray]]:
        """By job: (job, its texts' indices, their rows in the batch), in the order of jobs."""
        if self._parts is None:
            if self._grouped is None:
                present, _, rows, ends = ext.group_rows(self.job_of, len(self.jobs))
                self._grouped = rows, ends.tolist()
            rows, ends = self._grouped
            if len(self.jobs) == 1:
                self._parts = [(self.jobs[0], self.index, rows)]
            else:
                indices = self.index[rows]
                self._parts = [(job, indices[begin:end], rows[begin:end]) for job, begin, end
                               in zip(self.jobs, [0, *ends], ends)]
        return self._parts

    def gather(self, field: str) -> TokenRows:
        """The texts' ids (or, field "type_ids", segment ids) back to back, in batch order."""
        sources = [getattr(job, field) for job in self.jobs]
        return TokenRows(*ext.gather_rows([rows.flat for rows in sources],
                                          [rows.offsets for rows in sources],
                                          self.job_of, self.index, self.tokens))


class _InLine:
    """One job's texts in its caller's line: arrivals base .. base + n - 1. Which of them are
    cut the queue's window says (Queue._cut_flags)."""

    __slots__ = ("job", "base", "lengths", "cut", "start", "sequence", "by_length")

    def __init__(self, job: Job, base: int, lengths: np.ndarray):
        self.job, self.base, self.lengths, self.sequence = job, base, lengths, job.sequence
        self.cut = 0  # how many of its texts are cut
        self.start = 0  # none before its text `start` is waiting
        self.by_length = None

    def key(self, arrival: int) -> int:
        """A text's place in the sorted line: by length, then arrival."""
        return int(self.lengths[arrival - self.base]) << ARRIVAL_BITS | arrival


class Queue:
    """The texts waiting for a forward pass, from every caller. Not thread-safe (the batcher
    holds its lock around every call).

    All of them wait in one line sorted by length (the "sorted" texts). Callers take turns: each cut serves the caller
    served least recently, and within it, its oldest message first; so none starves (a backlog
    delays another caller's request by about one batch).
    - Usually the batch is the run of the sorted texts holding that caller's oldest text, where runs are
      cut greedily from the shortest so that rows x longest fits the budget: with many texts waiting,
      the batches of an offline loop over the sorted texts, so little is padded. (Starting the
      run at that text instead, without the runs below it, doubled the padding: fragments.)
    - A caller's first message (the first since its queue was empty: a new stream, a unary call)
      is cut as a lead instead: its texts in groups of similar length (padded, at most
      LEAD_SPREAD times their real tokens, or on a GPU while the padding's compute is under a
      pass's fixed cost; all of them when they are alike), each group filled
      up with the longest texts of other callers that fit under the group's longest (and are
      at least its longest / LEAD_SPREAD). Its answer then needs a batch or two, not a pass
      over every length waiting, which is what sorted runs do to a message whose texts
      have every length: a stream's first answer came after most of the job. The caller's own
      later messages are not fillers: a batch without them is smaller, not more padded, and
      finishes sooner (BENCHMARKS.md, probes/batch_order.py).
    - One lead that needs more than one batch at a time: another new caller's long first
      message meanwhile goes by sorted runs (see add()).
    """

    LEAD_SPREAD = 1.5

    def __init__(self, budget: int, pass_flops: Callable[[int, int, int], int] | None = None,
                 free_flops: float = 0):
        """pass_flops(rows, longest, real): a forward pass's floating-point operations
        (Engine.forward_flops). free_flops: padding that costs less compute than this is free
        (a GPU's pass costs its fixed overhead whatever its padding, up to a size;
        Engine.free_padding_flops): a lead's group may then go past LEAD_SPREAD. 0: never."""
        if free_flops and pass_flops is None:
            raise ValueError("free_flops needs pass_flops, to count what padding computes")
        self.budget = budget
        self.pass_flops, self.free_flops = pass_flops, free_flops
        self.waiting = 0  # texts not yet cut
        self._sorted: list[int] = []  # every waiting text's key (_InLine.key), sorted
        self._bases: list[int] = []  # each job in line's first arrival, ascending
        self._by_base: dict[int, _InLine] = {}
        self._lines: dict[object, list[_InLine]] = {}  # caller -> its jobs, by sequence
        self._leads: set = set()  # callers whose oldest job in line is cut as a lead
        self._long_lead = None  # the one of them whose lead needs more than one batch, if any
        self._arrivals = 0  # the next text's arrival
        # Whether each text from arrival _low on is cut: one array for every line, so that a
        # cut marks its texts in one step, not one a job.
        self._low, self._cut_flags = 0, np.zeros(1024, dtype=bool)
        self._cuts = 0  # batches cut so far
        self._served: dict[object, int] = {}  # caller -> the cut that last served it

    def add(self, job: Job) -> None:
        caller = job.who
        lengths = job.ids.lengths
        line = _InLine(job, self._arrivals, lengths)
        self._arrivals += len(lengths)
        if self._arrivals - self._low > len(self._cut_flags):
            flags = np.zeros(2 * (self._arrivals - self._low), dtype=bool)
            flags[:len(self._cut_flags)] = self._cut_flags
            self._cut_flags = flags
        if caller not in self._lines:
            self._lines[caller] = []
            # A lead helps when it is whole within a few cuts. Long leads side by side take
            # turns, so none is (four new streams: the first answer after 7.7 batch times,
            # against 10.1 with sorted runs only), while their groups padded the job 9% more
            # (probes/batch_order.py --streams 4). So a lead that needs more than one batch is
            # one only while no other such lead waits; a short one (a unary call) always is.
            fits = len(lengths) * int(lengths.max()) <= self.budget
            if fits or self._long_lead is None:
                self._leads.add(caller)
                if not fits:
                    self._long_lead = caller
        bisect.insort(self._lines[caller], line, key=lambda waiting: waiting.sequence)
        self._bases.append(line.base)  # arrivals only grow: still ascending
        self._by_base[line.base] = line
        keys = (lengths << ARRIVAL_BITS | np.arange(line.base, line.base + len(lengths))).tolist()
        if len(keys) < 32:
            for key in keys:
                bisect.insort(self._sorted, key)
        else:  # two sorted runs: one C-level merge, not an insertion per text
            self._sorted.extend(sorted(keys))
            self._sorted.sort()
        self.waiting += len(keys)

    def cut(self, budget: int | None = None) -> Batch:
        """The next batch, sorted by length (at least one text; the queue must not be empty),
        within budget tokens (rows x longest; default the queue's own)."""
        budget = self.budget if budget is None else max(1, budget)
        heads = {caller: self._oldest(line[0]) for caller, line in self._lines.items()}
        self._served = {caller: self._served.get(caller, -1) for caller in heads}
        turn = min(heads, key=lambda c: (self._served[c], heads[c]))
        self._cuts += 1
        self._served[turn] = self._cuts
        first = self._lines[turn][0]
        if turn in self._leads:
            keys = self._lead_batch(first, budget)
            for key in keys:
                del self._sorted[bisect.bisect_left(self._sorted, key)]
        else:
            keys = self._run_holding(first.key(heads[turn]), budget)
        batch = self._take(keys)
        self.waiting -= len(batch)
        for caller in {job.who for job in batch.jobs}:
            line = self._lines[caller]
            while line and self._oldest(line[0]) is None:
                gone = line.pop(0)
                del self._bases[bisect.bisect_left(self._bases, gone.base)]
                del self._by_base[gone.base]
                self._forget_cut()
                self._leads.discard(caller)  # its first message is all cut
                if self._long_lead is caller:
                    self._long_lead = None
            if not line:
                del self._lines[caller]
        return batch

    def _take(self, keys: list[int]) -> Batch:
        """The batch of these keys (sorted), its texts marked cut."""
        keys = np.array(keys, dtype=np.int64)
        arrivals = keys & ARRIVAL_MASK
        self._cut_flags[arrivals - self._low] = True
        bases = np.array(self._bases, dtype=np.int64)
        line_of = np.searchsorted(bases, arrivals, side="right") - 1  # into bases
        present, job_of, rows, ends = ext.group_rows(line_of, len(bases))
        ends = ends.tolist()
        lines = [self._by_base[base] for base in bases[present].tolist()]
        for line, begin, end in zip(lines, [0, *ends], ends):
            line.cut += end - begin
        return Batch([line.job for line in lines], job_of, arrivals - bases[line_of],
                     keys >> ARRIVAL_BITS, (rows, ends))

    def _oldest(self, line: _InLine) -> int | None:
        """The arrival of the line's oldest text not cut yet (None: all are)."""
        if line.cut == len(line.lengths):
            return None
        flags, at = self._cut_flags, line.base + line.start - self._low
        if flags[at]:
            line.start += int(np.argmin(flags[at:at + len(line.lengths) - line.start]))
        return line.base + line.start

    def _left(self, line: _InLine) -> np.ndarray:
        """The line's texts not cut yet (their indices), shortest first (sorted once, when
        first asked)."""
        if line.by_length is None:
            line.by_length = np.argsort(line.lengths, kind="stable")
        return line.by_length[~self._cut_flags[line.base - self._low + line.by_length]]

    def _forget_cut(self) -> None:
        """Drop the flags before the oldest line left, once they are most of the window."""
        low = self._bases[0] if self._bases else self._arrivals
        if low - self._low > max(1024, len(self._cut_flags) // 2):
            self._cut_flags = self._cut_flags[low - self._low:].copy()
            self._low = low

    def _line_of(self, arrival: int) -> _InLine:
        return self._by_base[self._bases[bisect.bisect_right(self._bases, arrival) - 1]]

    def _run_holding(self, anchor: int, budget: int) -> list[int]:
        """The keys of the run holding the anchor (a key), of the runs that cut the sorted line
        of texts greedily from the shortest (as an offline loop over the sorted texts would);
        they leave the sorted line."""
        ordered = self._sorted
        low, fits = ext.greedy_run(ordered, bisect.bisect_left(ordered, anchor), budget,
                                   ARRIVAL_BITS)
        keys = ordered[low:fits]
        del ordered[low:fits]
        return keys

    def _lead_batch(self, lead: _InLine, budget: int) -> list[int]:
        """The keys of the shortest group of a lead job's texts, filled up with the other
        callers' longest texts that fit under the group's longest, sorted. A group grows from the shortest text while it
        fits the budget and its padded tokens stay within LEAD_SPREAD of its real ones: a job of
        similar lengths is one pass, and on the CPU short texts are never padded to a long one
        (as one pass because they fit the budget, 8 short texts and one of 256 tokens cost 6x
        the work of two passes: tests/test_queue.py). Where padding is free up to free_flops
        (a GPU), the group also grows while what its padding computes (its pass against each
        text's own) stays under that: a stream's message of 64 paragraphs was 3.7 passes, now
        1.17 (BENCHMARKS.md, "One pass a message on a GPU")."""
        texts = self._left(lead)[:budget]  # a group has at most budget texts (each a token or more)
        lengths = lead.lengths[texts].tolist()
        group, real = 1, lengths[0]
        alone = None  # the group's texts each in a pass of their own (counted once needed)
        for length in lengths[1:]:
            rows, padded = group + 1, (group + 1) * length
            if padded > budget:
                break
            if alone is not None:
                alone += self.pass_flops(1, length, length)
            if padded > self.LEAD_SPREAD * (real + length):
                if not self.free_flops:
                    break
                if alone is None:
                    alone = sum(self.pass_flops(1, n, n) for n in lengths[:group + 1])
                if self.pass_flops(rows, length, real + length) - alone > self.free_flops:
                    break
            group += 1
            real += length
        longest = lengths[group - 1]
        keys = (lead.lengths[texts[:group]] << ARRIVAL_BITS | lead.base + texts[:group]).tolist()
        rows = max(1, budget // longest)
        caller, fillers = lead.job.who, 0
        below = bisect.bisect_right(self._sorted, longest << ARRIVAL_BITS | ARRIVAL_MASK)
        for at in range(below - 1, -1, -1):
            key = self._sorted[at]
            if group + fillers >= rows or (key >> ARRIVAL_BITS) * self.LEAD_SPREAD < longest:
                break  # full; or the rest would be padded more than a group's own texts
            if self._line_of(key & ARRIVAL_MASK).job.who is not caller:
                keys.append(key)
                fillers += 1
        return sorted(keys)
