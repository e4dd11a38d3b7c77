"""The texts waiting for a forward pass, from every caller, and the order batches are cut in."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Callable

from .jobs import Job

# The sorted line holds each text as one int, its length above its arrival: sorting and bisecting
# plain ints runs at C speed, where (length, arrival, item) tuples were compared element by
# element (a 64-text message into 100,000 waiting texts: 3.4 ms of the event loop, now 1.0;
# benchmarks/probes/queue_cost.py).
ARRIVAL_BITS = 48  # 2.8e14 texts a queue: 89 years at 100,000 texts a second
ARRIVAL_MASK = (1 << ARRIVAL_BITS) - 1


@dataclass(eq=False, slots=True)
class Queued:
    job: Job
    index: int
    length: int
    arrival: int  # order of arrival: the smallest is the oldest
    start: int  # where its ids begin in its job's (job.ids.flat)
    taken: bool = False  # cut into a batch (it may still sit in its caller's line)

    @property
    def key(self) -> int:
        """Its place in the sorted line: by length, then arrival."""
        return self.length << ARRIVAL_BITS | self.arrival


class _InLine:
    """One job's texts in its caller's line; `start` skips those cut from the front."""

    __slots__ = ("items", "start", "sequence", "by_length")

    def __init__(self, items: list[Queued]):
        self.items, self.start, self.sequence = items, 0, items[0].job.sequence
        self.by_length = None

    def oldest(self) -> Queued | None:
        """The oldest text not cut yet (None: all are)."""
        items = self.items
        while self.start < len(items) and items[self.start].taken:
            self.start += 1
        return items[self.start] if self.start < len(items) else None

    def left(self) -> list[Queued]:
        """Its texts not cut yet, shortest first (sorted once, when first asked)."""
        if self.by_length is None:
            self.by_length = sorted(self.items, key=lambda item: item.length)
        return [item for item in self.by_length if not item.taken]


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
        self._sorted: list[int] = []  # every waiting text's key (Queued.key), sorted
        self._items: dict[int, Queued] = {}  # arrival -> the waiting text
        self._lines: dict[object, list[_InLine]] = {}  # caller -> its jobs, by sequence
        self._leads: set = set()  # callers whose oldest job in line is cut as a lead
        self._long_lead = None  # the one of them whose lead needs more than one batch, if any
        self._arrivals = itertools.count()
        self._cuts = 0  # batches cut so far
        self._served: dict[object, int] = {}  # caller -> the cut that last served it

    def add(self, job: Job) -> None:
        caller = job.who
        offsets = job.ids.offsets.tolist()
        items = [Queued(job, index, end - start, next(self._arrivals), start)
                 for index, (start, end) in enumerate(zip(offsets, offsets[1:]))]
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
        self._items.update((item.arrival, item) for item in items)
        keys = [item.key for item in items]
        if len(keys) < 32:
            for key in keys:
                bisect.insort(self._sorted, key)
        else:  # two sorted runs: one C-level merge, not an insertion per text
            self._sorted.extend(sorted(keys))
            self._sorted.sort()
        self.waiting += len(items)

    def cut(self, budget: int | None = None) -> list[Queued]:
        """The next batch, sorted by length (at least one text; the queue must not be empty),
        within budget tokens (rows x longest; default the queue's own)."""
        budget = self.budget if budget is None else max(1, budget)
        heads = {caller: line[0].oldest() for caller, line in self._lines.items()}
        self._served = {caller: self._served.get(caller, -1) for caller in heads}
        turn = min(heads, key=lambda c: (self._served[c], heads[c].arrival))
        self._cuts += 1
        self._served[turn] = self._cuts
        if turn in self._leads:
            batch = self._lead_batch(self._lines[turn][0].left(), budget)
            for item in batch:
                del self._sorted[bisect.bisect_left(self._sorted, item.key)]
                del self._items[item.arrival]
        else:
            batch = self._run_holding(heads[turn], budget)
        self.waiting -= len(batch)
        for caller in {item.job.who for item in batch}:
            line = self._lines[caller]
            while line and line[0].oldest() is None:
                del line[0]
                self._leads.discard(caller)  # its first message is all cut
                if self._long_lead is caller:
                    self._long_lead = None
            if not line:
                del self._lines[caller]
        return batch

    def _run_holding(self, anchor: Queued, budget: int) -> list[Queued]:
        """The run holding the anchor, of the runs that cut the sorted line of texts greedily from the
        shortest (as an offline loop over the sorted texts would)."""
        ordered, shift = self._sorted, ARRIVAL_BITS  # a key >> shift: its text's length
        at = bisect.bisect_left(ordered, anchor.key)
        low = 0
        end = len(ordered)
        while True:  # runs from the shortest, each the longest that fits: gallop, then bisect
            fits, step = low + 1, 1  # ordered[low:fits] fits (one text always does)
            while fits + step <= end and \
                    (fits + step - low) * (ordered[fits + step - 1] >> shift) <= budget:
                fits, step = fits + step, step * 2
            over = min(fits + step, end + 1)  # ordered[low:over] does not fit, or runs past the end
            while over - fits > 1:
                middle = (fits + over) // 2
                if (middle - low) * (ordered[middle - 1] >> shift) <= budget:  # the last: longest
                    fits = middle
                else:
                    over = middle
            if fits > at:
                break
            low = fits
        high = fits
        batch = [self._items.pop(key & ARRIVAL_MASK) for key in ordered[low:high]]
        del ordered[low:high]
        for item in batch:
            item.taken = True
        return batch

    def _lead_batch(self, texts: list[Queued], budget: int) -> list[Queued]:
        """The shortest group of a lead job's texts, filled up with the other callers' longest
        texts that fit under the group's longest. A group grows from the shortest text while it
        fits the budget and its padded tokens stay within LEAD_SPREAD of its real ones: a job of
        similar lengths is one pass, and on the CPU short texts are never padded to a long one
        (as one pass because they fit the budget, 8 short texts and one of 256 tokens cost 6x
        the work of two passes: tests/test_queue.py). Where padding is free up to free_flops
        (a GPU), the group also grows while what its padding computes (its pass against each
        text's own) stays under that: a stream's message of 64 paragraphs was 3.7 passes, now
        1.17 (BENCHMARKS.md, "One pass a message on a GPU")."""
        group, real = texts[:1], texts[0].length
        alone = None  # the group's texts each in a pass of their own (counted once needed)
        for item in texts[1:]:
            rows, padded = len(group) + 1, (len(group) + 1) * item.length
            if padded > budget:
                break
            if alone is not None:
                alone += self.pass_flops(1, item.length, item.length)
            if padded > self.LEAD_SPREAD * (real + item.length):
                if not self.free_flops:
                    break
                if alone is None:
                    alone = sum(self.pass_flops(1, text.length, text.length)
                                for text in group + [item])
                if self.pass_flops(rows, item.length, real + item.length) - alone \
                        > self.free_flops:
                    break
            group.append(item)
            real += item.length
        longest = group[-1].length
        rows = max(1, budget // longest)
        fillers, caller = [], group[0].job.who
        below = bisect.bisect_right(self._sorted, longest << ARRIVAL_BITS | ARRIVAL_MASK)
        for at in range(below - 1, -1, -1):
            item = self._items[self._sorted[at] & ARRIVAL_MASK]
            if len(group) + len(fillers) >= rows or item.length * self.LEAD_SPREAD < longest:
                break  # full; or the rest would be padded more than a group's own texts
            if item.job.who is not caller:
                fillers.append(item)
        batch = sorted(group + fillers, key=lambda item: item.length)
        for item in batch:
            item.taken = True  # the caller drops them from the sorted texts
        return batch
