"""The memory held on behalf of clients: requests read ahead and answers not yet taken, across
every call, stream and connection.

Each request is bounded by its own limits; this bounds what one client can do with many of them.
Every connection (a gRPC peer, an HTTP connection) has an account. A request takes its cost (its
bytes and its answer's, Core.memory_cost) before any compute and gives it back once its answer
has left (or the call ended). A connection may hold at most `share` bytes, the server at most
`total` (a request alone on its connection, or on the server, is always admitted: none is
starved by its own size). Streams stop reading while their connection is over its share (gRPC
flow control then slows the sender) and gRPC unary calls wait for room (within their deadline);
an HTTP request that finds none gets 429. A connection with an answer ready that it does not take
for `stall_s` seconds (and what the answer's size needs at MIN_READ_RATE), while it blocks its own
calls or anyone waits on a nearly full total, is cut (MemoryBudget.stalled): its calls are cancelled
(what they held is freed) and its new calls refused, with RESOURCE_EXHAUSTED naming why, for
CUT_MEMORY_S. The time an answer takes to compute never counts. grpc Python cannot close a
connection from the server, so the connection itself stays open until its client closes it.
All on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from .errors import EmbedError

log = logging.getLogger("bertstream.budget")

CHECK_S = 1.0  # how often the watchdog looks for stalled connections
CUT_MEMORY_S = 60.0  # a cut connection's new calls are refused this long (ports get reused)
MIN_READ_RATE = 16 * 2**20  # bytes/s: an answer this big may take size / rate more to be read


class Hold:
    """Bytes one request holds against its connection: ready() once its answer is ready to go,
    release() once it has gone or the call ended (idempotent)."""

    def __init__(self, account: "Account", cost: int):
        self.account, self.cost = account, cost
        self._ready = self._released = False

    def ready(self) -> None:
        if not self._ready and not self._released:
            self._ready = True
            self.account._answer_ready(self.cost)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._ready:
            self.account._answer_taken()
        self.account._give(self.cost)


class Account:
    """One connection's holdings, and the calls to cancel if it stalls."""

    def __init__(self, budget: "MemoryBudget", key: str):
        self.budget, self.key = budget, key
        self.held = 0
        self.users = 0  # calls open on it; the account goes when the last one ends
        self.unsent = 0  # answers ready and not yet taken by the client
        self.progress = time.monotonic()  # since when its oldest unsent answer waits (or less)
        self.progress_bytes = 0  # and how big that answer is
        self.waiting = 0  # its calls and streams waiting for room
        self.cancels: set[Callable[[], None]] = set()
        self.cut = False

    def full(self) -> bool:
        return self.held >= self.budget.share

    def refusal(self) -> EmbedError:
        """Why a call that does not wait got no room (RESOURCE_EXHAUSTED / 429)."""
        if self.cut:
            return EmbedError.overloaded(self.budget.cut_message(self.key))
        budget = self.budget
        return EmbedError.overloaded(
            f"this connection holds {self.held:,} bytes of requests and answers not yet taken "
            f"(its share: {budget.share:,}, max_connection_held_bytes), the server "
            f"{budget.held:,} (max_held_bytes {budget.total:,}); read your answers, or retry "
            f"later")

    def try_hold(self, cost: int) -> Hold:
        """Hold `cost` now, or EmbedError (overloaded) saying why there is no room."""
        if self.cut or not self._fits(cost):
            raise self.refusal()
        self._add(cost)
        return Hold(self, cost)

    async def hold(self, cost: int) -> Hold:
        """Hold `cost`, waiting until it fits this connection's share and the server's total."""
        if self.cut or not self._fits(cost):
            await self._wait(lambda: self.cut or self._fits(cost))
            if self.cut:
                raise self.refusal()
        self._add(cost)
        return Hold(self, cost)

    async def room(self) -> None:
        """Wait until this connection is under its share (before a stream reads on)."""
        if self.full():
            await self._wait(lambda: self.cut or not self.full())

    def _fits(self, cost: int) -> bool:
        """Within the connection's share and the server's total; one request alone on its
        connection, or on the server, always fits (none is starved by its own size)."""
        budget = self.budget
        return ((not self.held or self.held + cost <= budget.share)
                and (not budget.held or budget.held + cost <= budget.total))

    async def _wait(self, predicate) -> None:
        budget = self.budget
        budget.waiting += 1
        self.waiting += 1
        try:
            async with budget.changed:
                await budget.changed.wait_for(predicate)
        finally:
            budget.waiting -= 1
            self.waiting -= 1

    def _add(self, cost: int) -> None:
        self.held += cost
        self.budget.held += cost
        self.budget.peak = max(self.budget.peak, self.budget.held)

    def _give(self, cost: int) -> None:
        self.held -= cost
        self.budget.held -= cost
        self.budget.notify()

    def _answer_ready(self, cost: int) -> None:
        if not self.unsent:
            self.progress, self.progress_bytes = time.monotonic(), cost
        self.unsent += 1

    def _answer_taken(self) -> None:
        self.unsent -= 1
        self.progress = time.monotonic()


class MemoryBudget:
    def __init__(self, total: int, share: int, stall_s: float):
        self.total, self.share, self.stall_s = total, share, stall_s
        self.held = 0
        self.peak = 0
        self.waiting = 0  # calls and streams waiting for room
        self.cuts = 0
        self.accounts: dict[str, Account] = {}
        self.cut_keys: dict[str, float] = {}  # connection -> when it was cut
        self.changed = asyncio.Condition()
        self._watch: asyncio.Task | None = None

    def open(self, key: str, cancel: Callable[[], None] | None = None) -> Account:
        """The account of connection `key`, for one more call (close() it when the call ends);
        cancel() is called if the connection is cut."""
        account = self.accounts.get(key)
        if account is None:
            account = self.accounts[key] = Account(self, key)
            cut_at = self.cut_keys.get(key)
            account.cut = cut_at is not None and time.monotonic() - cut_at < CUT_MEMORY_S
        account.users += 1
        if cancel is not None:
            account.cancels.add(cancel)
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._watch_stalls())
        return account

    def close(self, account: Account, cancel: Callable[[], None] | None = None) -> None:
        account.cancels.discard(cancel)
        account.users -= 1
        if account.users <= 0 and self.accounts.get(account.key) is account:
            del self.accounts[account.key]

    def notify(self) -> None:
        """Wake the calls waiting for room (none: nothing to do, as for almost every call)."""
        if not self.waiting:
            return

        async def wake():
            async with self.changed:
                self.changed.notify_all()
        asyncio.ensure_future(wake())

    def cut_message(self, key: str) -> str:
        return (f"connection {key} held its share of {self.share:,} bytes of answers "
                f"(max_connection_held_bytes) for {self.stall_s:g} s without reading them; "
                f"its calls are cancelled")

    def stalled(self, account: Account, now: float) -> bool:
        """It has an answer ready that waits for its reader, beyond stall_s (and what the
        answer's size needs), while it keeps its own calls, or anyone, from room: it is at its
        share, or its calls wait, or the server's total is all but full and someone waits."""
        total_full = self.waiting and self.held + self.share > self.total
        blocking = account.full() or account.waiting or total_full
        patience = self.stall_s + account.progress_bytes / MIN_READ_RATE
        return bool(account.unsent and blocking and now - account.progress > patience)

    async def _watch_stalls(self) -> None:
        while True:
            await asyncio.sleep(CHECK_S)
            try:
                self._cut_stalled(time.monotonic())
            except Exception:  # never lose the watchdog
                log.exception("the memory budget's watchdog failed a round")

    def _cut_stalled(self, now: float) -> None:
        for key in [k for k, at in self.cut_keys.items() if now - at >= CUT_MEMORY_S]:
            del self.cut_keys[key]
        for account in [a for a in self.accounts.values() if not a.cut and self.stalled(a, now)]:
            account.cut = True
            self.cuts += 1
            if not account.key.startswith("http:"):  # an HTTP connection is closed with it
                self.cut_keys[account.key] = now
            log.warning("connection cut", extra={"fields": {
                "peer": account.key, "held_bytes": account.held, "calls": account.users,
                "reason": self.cut_message(account.key)}})
            for cancel in list(account.cancels):
                cancel()
            self.notify()

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
