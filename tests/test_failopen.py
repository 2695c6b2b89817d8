"""The fail-open guard: pauses that double, one warning per outage, and the probe that ends one."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from serve_app.failopen import Backoff, FailOpen, describe

logger = logging.getLogger("tests.failopen")


def guard(**kwargs: Any) -> FailOpen:
    return FailOpen(logger, lost="lost (%(error)s), retrying in %(pause_s).2f s",
                    back="back after %(seconds).1f s and %(failures)d failures", **kwargs)


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger.name and r.levelno == level]


def test_pauses_double_up_to_the_cap_and_a_success_starts_again() -> None:
    backoff = Backoff(0.5, 3.0)
    assert [backoff.failed() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff.paused() and 2.9 < backoff.retry_in() <= 3.0
    backoff.succeeded()
    assert not backoff.paused() and backoff.retry_in() == 0.0 and backoff.failed() == 0.5


def test_first_pause_is_capped_too() -> None:
    assert Backoff(10.0, 4.0).failed() == 4.0


def test_jitter_keeps_half_to_all_of_each_pause() -> None:
    backoff = Backoff(1.0, 8.0, jitter=True)
    for nominal in (1.0, 2.0, 4.0, 8.0, 8.0):
        assert nominal * 0.5 <= backoff.failed() <= nominal


@pytest.mark.parametrize(("exc", "text"), [
    pytest.param(TimeoutError(), "TimeoutError", id="no-message"),
    pytest.param(ConnectionError("refused\nmore detail"), "ConnectionError: refused", id="first-line"),
])
def test_describe(exc: BaseException, text: str) -> None:
    assert describe(exc) == text


async def test_without_a_probe_the_first_call_after_a_pause_is_the_test(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=logger.name)
    g = guard(backoff=Backoff(0.05, 1.0))
    assert g.available and not g.paused()
    assert g.failed(ConnectionError("refused")) == 0.05
    assert not g.available and g.paused() and g.outages == 1
    await asyncio.sleep(0.06)
    assert not g.paused() and not g.available  # worth a try, the outage is not over yet
    assert g.failed(ConnectionError("refused")) == 0.1  # it failed again: a longer pause, no new warning
    assert messages(caplog, logging.WARNING) == ["lost (ConnectionError: refused), retrying in 0.05 s"]
    assert g.succeeded() and g.available and not g.paused()
    assert not g.succeeded()  # nothing to recover from
    [back] = messages(caplog, logging.INFO)
    assert back.startswith("back after ") and back.endswith(" s and 2 failures")
    assert g.failed(TimeoutError()) == 0.05 and g.outages == 2  # a new outage starts from first_s
    assert len(messages(caplog, logging.WARNING)) == 2


async def test_a_probe_closes_the_breaker_after_retrying_with_backoff(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=logger.name)
    answers = [ConnectionError("still down"), ConnectionError("still down"), None]
    calls = 0

    async def ping() -> None:
        nonlocal calls
        calls += 1
        answer = answers.pop(0)
        if answer is not None:
            raise answer

    g = guard(probe=ping, backoff=Backoff(0.02, 0.04, jitter=True))
    g.failed(ConnectionError("refused"))
    g.failed(ConnectionError("refused"))  # a call that was under way as the outage began: no effect
    assert g.paused() and g.outages == 1 and calls == 0
    await asyncio.sleep(0.01)
    assert g.paused(), "with a probe, callers skip the dependency past the pause, until the probe answers"
    async with asyncio.timeout(2):
        while not g.available:
            await asyncio.sleep(0.005)
    assert calls == 3 and not g.paused() and g.outages == 1
    assert len(messages(caplog, logging.WARNING)) == 1 and len(messages(caplog, logging.INFO)) == 1
    await g.aclose()


async def test_aclose_stops_a_probe_that_never_succeeds() -> None:
    async def hang() -> None:
        await asyncio.sleep(3600)

    g = guard(probe=hang, probe_timeout_s=0.01, backoff=Backoff(0.01, 0.02))
    g.failed(ConnectionError("refused"))
    await asyncio.sleep(0.05)
    await asyncio.wait_for(g.aclose(), 2)
    assert not g.available


async def test_traceback_is_logged_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=logger.name)
    try:
        raise KeyError("bug")
    except KeyError as exc:
        guard(log_traceback=True).failed(exc)
        guard().failed(exc)
    with_tb, without = [r for r in caplog.records if r.name == logger.name]
    assert with_tb.exc_info is not None and not without.exc_info
