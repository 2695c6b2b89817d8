"""Priority admission in front of a full local model: order, timeouts, abandoned waiters."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.errors import ServiceUnavailable
from serve_app.ingress.admission import Admission


async def test_waiters_enter_by_priority_then_arrival() -> None:
    admission = Admission(timeout_s=5)
    holder = await admission.enter("m", 1, priority=0)
    entered: list[str] = []

    async def wait(name: str, priority: int) -> None:
        release = await admission.enter("m", 1, priority)
        entered.append(name)
        await asyncio.sleep(0.01)
        release()

    tasks = []
    for name, priority in [("low-1", 0), ("high", 50), ("low-2", 0), ("mid", 10)]:
        tasks.append(asyncio.create_task(wait(name, priority)))
        await asyncio.sleep(0.01)  # arrival order is the order above
    assert admission.queued("m") == 4 and entered == []
    holder()
    await asyncio.gather(*tasks)
    assert entered == ["high", "mid", "low-1", "low-2"]


async def test_capacity_admits_that_many_at_once() -> None:
    admission = Admission(timeout_s=5)
    releases = [await admission.enter("m", 3, 0) for _ in range(3)]
    late = asyncio.create_task(admission.enter("m", 3, 0))
    await asyncio.sleep(0.02)
    assert not late.done()
    releases[0]()
    (await late)()
    releases[0]()  # a second call is a no-op, not a second slot
    for release in releases[1:]:
        release()
    assert [await admission.enter("m", 3, 0) for _ in range(3)]  # all three slots are free again


async def test_a_wait_past_the_timeout_is_503_model_busy_with_retry_after() -> None:
    admission = Admission(timeout_s=0.05)
    await admission.enter("m", 1, 0)
    with pytest.raises(ServiceUnavailable) as refused:
        await admission.enter("m", 1, 99)
    assert refused.value.code == "model_busy" and refused.value.headers["Retry-After"] == "1"
    assert admission.queued("m") == 0


async def test_an_abandoned_waiter_does_not_keep_a_slot() -> None:
    admission = Admission(timeout_s=5)
    holder = await admission.enter("m", 1, 0)
    gone = asyncio.create_task(admission.enter("m", 1, 5))
    await asyncio.sleep(0.01)
    gone.cancel()  # the client disconnected while queued
    await asyncio.gather(gone, return_exceptions=True)
    holder()
    release = await asyncio.wait_for(admission.enter("m", 1, 0), 1)  # the slot came back
    release()


async def test_models_are_gated_separately() -> None:
    admission = Admission(timeout_s=0.05)
    await admission.enter("a", 1, 0)
    (await admission.enter("b", 1, 0))()
