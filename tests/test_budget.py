"""The memory budget (server/budget.py) on its own: shares, the total, waiting, refusal, and the
cut of a connection that does not take its answers."""

from __future__ import annotations

import asyncio

import pytest

from bertstream.server import budget as budget_module
from bertstream.server.budget import MemoryBudget
from bertstream.server.errors import EmbedError, ErrorKind


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def test_a_connection_waits_at_its_share_and_is_woken_when_an_answer_goes():
    async def scenario():
        budget = MemoryBudget(total=1000, share=100, stall_s=60)
        account = budget.open("a")
        first = await account.hold(60)
        second = asyncio.ensure_future(account.hold(60))  # 120 > 100: waits
        await asyncio.sleep(0.01)
        assert not second.done() and budget.waiting == 1
        with pytest.raises(EmbedError) as refused:
            account.try_hold(60)
        assert refused.value.kind is ErrorKind.OVERLOADED
        assert "max_connection_held_bytes" in refused.value.message
        first.release()
        (await second).release()
        assert account.held == budget.held == 0 and budget.peak == 60
        budget.stop()

    run(scenario())


def test_the_total_bounds_every_connection_together_but_never_starves_one_alone():
    async def scenario():
        budget = MemoryBudget(total=150, share=100, stall_s=60)
        a, b, c = budget.open("a"), budget.open("b"), budget.open("c")
        held_a = a.try_hold(100)
        with pytest.raises(EmbedError):
            b.try_hold(60)  # 160 > 150 in all
        held_b = b.try_hold(50)
        waiting = asyncio.ensure_future(c.hold(120))  # alone on its connection, over the share
        await asyncio.sleep(0.01)
        assert not waiting.done()  # the total is full
        for hold in (held_a, held_b):
            hold.release()
            hold.release()  # idempotent
        alone = await waiting  # alone on the server now: admitted
        assert budget.held == 120
        alone.release()
        assert budget.held == 0
        budget.stop()

    run(scenario())


def test_a_connection_that_does_not_take_its_answers_is_cut(monkeypatch):
    monkeypatch.setattr(budget_module, "CHECK_S", 0.01)

    async def scenario():
        budget = MemoryBudget(total=1000, share=100, stall_s=0.1)
        cancelled = []
        slow = budget.open("slow", lambda: cancelled.append("slow"))
        computing = budget.open("computing", lambda: cancelled.append("computing"))
        slow.try_hold(100).ready()  # its answer is ready; it never takes it
        computing.try_hold(100)  # still computing: however long, not the client's fault
        await asyncio.sleep(0.4)
        assert cancelled == ["slow"] and budget.cuts == 1
        again = budget.open("slow")  # a cut connection's next call
        assert again.cut
        with pytest.raises(EmbedError) as refused:
            again.try_hold(1)
        assert "without reading them" in refused.value.message
        assert not budget.open("someone else").cut
        budget.stop()

    run(scenario())


def test_an_answer_taken_in_time_is_never_cut(monkeypatch):
    monkeypatch.setattr(budget_module, "CHECK_S", 0.01)

    async def scenario():
        budget = MemoryBudget(total=1000, share=100, stall_s=0.1)
        cancelled = []
        account = budget.open("steady", lambda: cancelled.append(True))
        for _ in range(10):  # at its share all along, taking an answer every 50 ms
            hold = account.try_hold(100)
            hold.ready()
            await asyncio.sleep(0.05)
            hold.release()
        assert not cancelled and budget.cuts == 0
        budget.stop()

    run(scenario())
