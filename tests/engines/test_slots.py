"""The engine's run slots without a model: linger after a higher class, and a class's budget."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve_app.engines.slots import RunSlots
from serve_app.errors import ServiceUnavailable
from serve_app.fair_queue import Turn

LOW = Turn(priority=1, tenant="low", rank=0, label="low", max_wait_s=0.3)
HIGH = Turn(priority=90, tenant="high", rank=2, label="high")


async def test_after_a_higher_class_the_slot_lingers_for_its_next_request() -> None:
    """A client sending high-priority requests back to back: the low one waiting must not start in the
    gap between them (it would be preempted at once, paying its resume for nothing)."""
    slots = RunSlots(1, linger_s=0.2)
    high = await slots.acquire(HIGH)
    low = asyncio.ensure_future(slots.acquire(LOW))
    await asyncio.sleep(0.01)
    slots.release(high)
    await asyncio.sleep(0.02)  # the next high request is on its way
    assert not low.done()
    again = await asyncio.wait_for(slots.acquire(HIGH), 0.05)  # at once, though the low one came first
    slots.release(again)
    started = time.perf_counter()
    slot = await asyncio.wait_for(low, 1)  # and the low one starts once the linger is over
    assert time.perf_counter() - started < 0.5
    slots.release(slot)


async def test_no_linger_when_the_same_class_waits() -> None:
    slots = RunSlots(1, linger_s=5)
    first = await slots.acquire(LOW)
    second = asyncio.ensure_future(slots.acquire(LOW))
    await asyncio.sleep(0.01)
    slots.release(first)
    slots.release(await asyncio.wait_for(second, 0.1))


async def test_a_lower_class_kept_waiting_past_its_budget_is_refused() -> None:
    slots = RunSlots(1, linger_s=0)
    high = await slots.acquire(HIGH)
    started = time.perf_counter()
    with pytest.raises(ServiceUnavailable) as refused:
        await slots.acquire(LOW, waited_s=0.1)  # 0.1 of its 0.3 s already used by an earlier wait
    assert 0.15 < time.perf_counter() - started < 1.0
    assert refused.value.code == "overloaded" and "Retry-After" in refused.value.headers
    assert slots.waiting == 0
    slots.release(high)
    slots.release(await asyncio.wait_for(slots.acquire(LOW), 0.1))  # the slot is free for the next
