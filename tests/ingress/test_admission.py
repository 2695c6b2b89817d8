"""Admission gates: order (priority, fair share, arrival), capacity and burst, shedding, timeouts,
abandoned waiters."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

import pytest

from serve_app.errors import ServiceUnavailable
from serve_app.fair_queue import GateLimits, Turn
from serve_app.ingress.admission import Admission, Release

ONE = GateLimits(1)
LOW, HIGH = Turn(1, "low-key", rank=0, label="low"), Turn(90, "high-key", rank=2, label="high")


def turn(priority: int, tenant: str = "k", rank: int = 0) -> Turn:
    return Turn(priority, tenant, rank=rank)


def budget(t: Turn, max_wait_s: float) -> Turn:
    return dataclasses.replace(t, max_wait_s=max_wait_s)


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


async def record_entries(admission: Admission, arrivals: list[tuple[str, Turn]], limits: GateLimits = ONE
                         ) -> list[str]:
    """Queue ``arrivals`` in that order behind a holder, free the gate, and return the order they
    entered in."""
    holder = await admission.enter("m", limits, turn(0))
    entered: list[str] = []

    async def wait(name: str, t: Turn) -> None:
        release = await admission.enter("m", limits, t)
        entered.append(name)
        await asyncio.sleep(0.005)
        release()

    tasks = []
    for i, (name, t) in enumerate(arrivals):
        tasks.append(asyncio.create_task(wait(name, t)))
        await until(lambda i=i: admission.queued("m") == i + 1, "arrivals did not queue")
    holder()
    await asyncio.gather(*tasks)
    return entered


async def test_waiters_enter_by_priority_then_arrival() -> None:
    entered = await record_entries(Admission(timeout_s=5), [
        ("low-1", turn(0)), ("high", turn(50)), ("low-2", turn(0)), ("mid", turn(10))])
    assert entered == ["high", "mid", "low-1", "low-2"]


async def test_keys_of_one_priority_take_turns() -> None:
    """A key with four requests in line does not starve a key that came after them."""
    arrivals = [(f"a{i}", turn(5, "key-a")) for i in range(4)] + [("b0", turn(5, "key-b"))]
    entered = await record_entries(Admission(timeout_s=5), arrivals)
    assert entered == ["a0", "b0", "a1", "a2", "a3"]


async def test_capacity_admits_that_many_at_once() -> None:
    admission, three = Admission(timeout_s=5), GateLimits(3)
    releases = [await admission.enter("m", three, LOW) for _ in range(3)]
    late = asyncio.create_task(admission.enter("m", three, LOW))
    await asyncio.sleep(0.02)
    assert not late.done()
    releases[0]()
    (await late)()
    releases[0]()  # a second call is a no-op, not a second slot
    for release in releases[1:]:
        release()
    assert [await admission.enter("m", three, LOW) for _ in range(3)]  # all three slots are free again


async def test_a_higher_class_goes_past_capacity_into_the_burst_room() -> None:
    """The engine behind this gate preempts: a high-priority request must reach it, not wait here for
    the low-priority generation to end. Lower classes never use the burst room."""
    admission, limits = Admission(timeout_s=5), GateLimits(1, burst=2)
    await admission.enter("m", limits, LOW)
    low_waiting = asyncio.create_task(admission.enter("m", limits, LOW))
    await until(lambda: admission.queued("m") == 1, "the second low did not queue")
    first_high = await asyncio.wait_for(admission.enter("m", limits, HIGH), 0.5)  # at once
    await asyncio.wait_for(admission.enter("m", limits, HIGH), 0.5)  # the burst room holds two
    third_high = asyncio.create_task(admission.enter("m", limits, HIGH))
    await asyncio.sleep(0.02)
    assert not third_high.done() and not low_waiting.done()  # 1 + 2 in flight: full
    first_high()
    await asyncio.wait_for(third_high, 0.5)  # the high goes before the low that came first
    assert not low_waiting.done()
    low_waiting.cancel()


async def test_the_same_class_gets_no_burst_room() -> None:
    admission, limits = Admission(timeout_s=5), GateLimits(1, burst=2)
    await admission.enter("m", limits, HIGH)
    second = asyncio.create_task(admission.enter("m", limits, HIGH))
    await asyncio.sleep(0.02)
    assert not second.done()
    second.cancel()


async def trained(admission: Admission, limits: GateLimits, hold_s: float) -> None:
    """Let the gate measure how long a request holds its slot."""
    for _ in range(3):
        release = await admission.enter("m", limits, LOW)
        await asyncio.sleep(hold_s)
        release()


async def test_past_its_class_budget_a_request_is_refused_at_once_with_retry_after() -> None:
    admission = Admission(timeout_s=30)
    await trained(admission, ONE, 0.05)
    await admission.enter("m", ONE, LOW)  # in flight: the next one waits ~0.05 s, the one after ~0.1 s
    low = budget(LOW, 0.12)
    queued = [asyncio.create_task(admission.enter("m", ONE, low)) for _ in range(2)]
    await until(lambda: admission.queued("m") == 2, "two lows did not queue")
    started = time.perf_counter()
    with pytest.raises(ServiceUnavailable) as refused:
        await admission.enter("m", ONE, low)  # ~0.15 s: over budget
    assert time.perf_counter() - started < 0.05  # refused at once, not after waiting
    error = refused.value
    assert error.status_code == 503 and error.code == "overloaded"
    assert int(error.headers["Retry-After"]) >= 1 and int(error.headers["retry-after-ms"]) >= 1000
    assert "low-priority" in error.message
    for task in queued:
        task.cancel()


async def test_nothing_is_shed_on_arrival_before_the_gate_has_measured_a_hold_time() -> None:
    admission = Admission(timeout_s=30)
    await admission.enter("m", ONE, LOW)
    waiting = [asyncio.create_task(admission.enter("m", ONE, budget(LOW, 0.3))) for _ in range(5)]
    await until(lambda: admission.queued("m") == 5, "five lows did not queue")
    for task in waiting:
        task.cancel()


async def test_a_request_still_waiting_when_its_class_budget_runs_out_is_refused_then() -> None:
    """Not after the 30 s backstop: the class said how long it may wait."""
    admission = Admission(timeout_s=30)
    await admission.enter("m", ONE, LOW)
    started = time.perf_counter()
    with pytest.raises(ServiceUnavailable) as refused:
        await admission.enter("m", ONE, budget(LOW, 0.2))
    assert 0.19 <= time.perf_counter() - started < 2
    assert refused.value.code == "overloaded" and "Retry-After" in refused.value.headers
    assert admission.queued("m") == 0


async def test_a_class_that_higher_classes_keep_busy_is_refused_at_once() -> None:
    """High-priority requests passing through the burst room never queue, yet they take the slot: a
    low-priority arrival must see that, not a short line."""
    admission, limits = Admission(timeout_s=30), GateLimits(1, burst=1)
    for _ in range(4):  # the slot is held by high-priority requests back to back
        release = await admission.enter("m", limits, HIGH)
        await asyncio.sleep(0.1)
        release()
    await admission.enter("m", limits, HIGH)
    started = time.perf_counter()
    with pytest.raises(ServiceUnavailable) as refused:
        await admission.enter("m", limits, budget(LOW, 1.0))  # one request ahead, but the highs fill the gate
    assert time.perf_counter() - started < 0.05
    assert refused.value.code == "overloaded"


async def test_a_higher_priority_arrival_pushes_out_the_lower_ones_that_no_longer_fit() -> None:
    admission = Admission(timeout_s=30)
    await trained(admission, ONE, 0.05)
    await admission.enter("m", ONE, LOW)
    low = budget(LOW, 0.12)
    first, last = (asyncio.create_task(admission.enter("m", ONE, low)) for _ in range(2))
    await until(lambda: admission.queued("m") == 2, "two lows did not queue")
    high = asyncio.create_task(admission.enter("m", ONE, HIGH))  # no budget: never shed
    with pytest.raises(ServiceUnavailable) as pushed:
        await asyncio.wait_for(last, 0.5)  # its wait grew past its budget: refused now, not later
    assert pushed.value.code == "overloaded" and "Retry-After" in pushed.value.headers
    assert not first.done() and not high.done() and admission.queued("m") == 2
    first.cancel()
    high.cancel()


async def test_a_wait_past_the_timeout_is_503_model_busy_with_retry_after() -> None:
    admission = Admission(timeout_s=0.05)
    await admission.enter("m", ONE, LOW)
    with pytest.raises(ServiceUnavailable) as refused:
        await admission.enter("m", ONE, HIGH)
    assert refused.value.code == "model_busy" and refused.value.headers["Retry-After"] == "1"
    assert admission.queued("m") == 0


async def test_an_abandoned_waiter_does_not_keep_a_slot() -> None:
    admission = Admission(timeout_s=5)
    holder = await admission.enter("m", ONE, LOW)
    gone = asyncio.create_task(admission.enter("m", ONE, HIGH))
    await until(lambda: admission.queued("m") == 1, "the waiter did not queue")
    gone.cancel()  # the client disconnected while queued
    await asyncio.gather(gone, return_exceptions=True)
    assert admission.queued("m") == 0
    holder()
    release = await asyncio.wait_for(admission.enter("m", ONE, LOW), 1)  # the slot came back
    release()


async def test_gates_are_separate() -> None:
    admission = Admission(timeout_s=0.05)
    await admission.enter("a", ONE, LOW)
    entered: Awaitable[Release] = admission.enter("b", ONE, LOW)
    (await entered)()
