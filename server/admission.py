"""Admission to the batcher's pool: room for a bounded number of texts, first come, first served.

A request takes room for its texts before any of its work starts (tokenizing included). The room
is given back when those texts leave the pool, taken into a forward pass or dropped because their
caller went away, not when the caller stops waiting: a cancelled job's texts still in the pool
keep holding theirs. Waiting requests are admitted strictly in arrival order, so a big stream
message at the head of the line is not overtaken forever by a flow of small calls; a request
larger than the whole limit is admitted once the pool is empty.
"""

from __future__ import annotations

import asyncio
import collections
import threading


class Admission:
    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop):
        self.limit = limit
        self._loop = loop
        self._lock = threading.Lock()  # release() comes from the batcher's threads
        self._queued = 0  # texts admitted and still in the pool
        self._waiting: collections.deque = collections.deque()  # [texts, future], arrival order

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _fits(self, texts: int) -> bool:
        return not self._queued or self._queued + texts <= self.limit

    def try_take(self, texts: int) -> bool:
        """Room now, or False (nothing taken): when the pool is too full, or others wait."""
        with self._lock:
            if self._waiting or not self._fits(texts):
                return False
            self._queued += texts
            return True

    async def take(self, texts: int) -> None:
        """Room for `texts`, waiting behind every request that came before."""
        with self._lock:
            if not self._waiting and self._fits(texts):
                self._queued += texts
                return
            waiter = [texts, self._loop.create_future()]
            self._waiting.append(waiter)
        try:
            await waiter[1]
        except asyncio.CancelledError:
            with self._lock:
                if waiter in self._waiting:  # never granted: just leave the line
                    self._waiting.remove(waiter)
                    granted = False
                else:
                    granted = waiter[1].done() and not waiter[1].cancelled()
            if granted:  # granted, then cancelled before it could run: give the room back
                self.release(texts)
            raise

    def release(self, texts: int) -> None:
        """Texts left the pool (from any thread): admit the waiting requests that now fit."""
        with self._lock:
            self._queued -= texts
            granted = []
            while self._waiting and self._fits(self._waiting[0][0]):
                waiter = self._waiting.popleft()
                self._queued += waiter[0]
                granted.append(waiter)
        for waiter in granted:
            self._loop.call_soon_threadsafe(self._grant, waiter)

    def _grant(self, waiter) -> None:
        texts, future = waiter
        if future.cancelled():  # its caller left between the grant and now
            self.release(texts)
        else:
            future.set_result(None)
