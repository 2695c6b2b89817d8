"""The rate limiter against real Redis: counting, 429s, the sliding window, and failing open."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from redis.asyncio import Redis

from serve_app import metrics
from serve_app.auth.keystore import KeyInfo
from serve_app.errors import RateLimited
from serve_app.ingress.rate_limit import NO_HEADERS, RateLimiter, _wait_ms, duration
from serve_app.redis_client import make_redis
from tests.conftest import REDIS_URL
from tests.support.tcp_proxy import TcpProxy, unused_port

MakeLimiter = Callable[..., RateLimiter]


def key(rpm: int | None = None, tpm: int | None = None) -> KeyInfo:
    return KeyInfo(id=str(uuid.uuid4()), prefix="iir-test", description="", priority=0, scopes=("inference",),
                   created_at=datetime.now(UTC), expires_at=None, revoked_at=None,
                   rate_limit_rpm=rpm, rate_limit_tpm=tpm)


class CountingRedis(Redis):
    """Counts every command this client sends: the proof that a code path never touched Redis."""

    commands = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands += 1
        return await super().execute_command(*args, **options)


@pytest.fixture(scope="module", autouse=True)
def metrics_backend_loaded() -> None:
    """The first metric recorded in a process loads its backend (and imports Ray, most of a second):
    a one-time cost that the fail-open timings below must not count."""
    metrics.REDIS_FAIL_OPEN._made()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = f"iir-test:{uuid.uuid4().hex}:"
    yield name
    async with Redis.from_url(REDIS_URL) as redis:
        stale = [k async for k in redis.scan_iter(match=name + "*")]
        if stale:
            await redis.delete(*stale)


@pytest.fixture
async def make_limiter(prefix: str) -> AsyncIterator[MakeLimiter]:
    made: list[RateLimiter] = []

    # Generous by default: on a busy CI box a healthy Redis can take longer than production's 0.25 s,
    # and a limiter that failed open would make the counting tests meaningless. The fail-open tests
    # pass their own short timeouts.
    def make(url: str = REDIS_URL, *, timeout_s: float = 2.0, redis: Redis | None = None,
             **kwargs: Any) -> RateLimiter:
        client = redis if redis is not None else make_redis(url, timeout_s=timeout_s)
        limiter = RateLimiter(client, timeout_s=timeout_s, key_prefix=prefix, **kwargs)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.aclose()


@pytest.fixture
def limiter_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], list[str]]]:
    caplog.set_level(logging.INFO, logger="serve_app.ingress.rate_limit")
    yield lambda: [r.getMessage() for r in caplog.records
                   if r.name == "serve_app.ingress.rate_limit" and r.levelno == logging.WARNING]


# -- the arithmetic ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("ms", "text"), [
    pytest.param(0, "0ms", id="zero"),
    pytest.param(20, "20ms", id="millis"),
    pytest.param(1000, "1s", id="one-second"),
    pytest.param(1500, "1.5s", id="fraction"),
    pytest.param(360_000, "6m0s", id="minutes"),
    pytest.param(69_600, "1m9.6s", id="minutes-and-fraction"),
])
def test_reset_durations_are_written_like_openai(ms: int, text: str) -> None:
    assert duration(ms) == text


@pytest.mark.parametrize(("limit", "current", "previous", "elapsed", "wait"), [
    pytest.param(10, 3, 0, 30_000, 0, id="room-left"),
    pytest.param(10, 10, 0, 30_000, 30_000 + 6_000, id="full-this-minute"),
    # 10 last minute, 5 this one, 30 s in: 10 * 0.5 + 5 = 10 used; room once 1 of the 10 slid out (6 s)
    pytest.param(10, 5, 10, 30_000, 6_000, id="previous-minute-slides-out"),
    pytest.param(0, 0, 0, 0, 60_000, id="zero-limit"),
])
def test_wait_until_one_more_fits(limit: int, current: int, previous: int, elapsed: int, wait: int) -> None:
    assert _wait_ms(limit, current, previous, elapsed, 60_000) == wait


# -- against Redis ----------------------------------------------------------------------------------


async def test_requests_over_the_limit_get_429_with_openai_headers(make_limiter: MakeLimiter) -> None:
    limiter, k = make_limiter(), key(rpm=3)
    remaining = [(await limiter.check(k))["x-ratelimit-remaining-requests"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    with pytest.raises(RateLimited) as refused:
        await limiter.check(k)
    headers = refused.value.headers
    assert refused.value.status_code == 429 and refused.value.code == "rate_limit_exceeded"
    assert headers["x-ratelimit-limit-requests"] == "3" and headers["x-ratelimit-remaining-requests"] == "0"
    # A fresh key filled its minute: room comes back after this minute plus a third of the next.
    assert 20 <= int(headers["retry-after"]) <= 80
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert "tokens" not in " ".join(headers)  # no tokens limit, no tokens headers
    assert "Limit 3" in refused.value.message and "RPM" in refused.value.message


async def test_refused_requests_are_not_counted(make_limiter: MakeLimiter, prefix: str) -> None:
    limiter, k = make_limiter(), key(rpm=2)
    for _ in range(2):
        await limiter.check(k)
    for _ in range(5):
        with pytest.raises(RateLimited):
            await limiter.check(k)
    async with Redis.from_url(REDIS_URL) as redis:
        assert await redis.hget(prefix + k.id, "rc") == b"2"
        assert 0 < await redis.pttl(prefix + k.id) <= 120_000  # gone two minutes after last use


async def test_tokens_limit_counts_usage_added_after_responses(make_limiter: MakeLimiter) -> None:
    limiter, k = make_limiter(), key(tpm=10)
    headers = await limiter.check(k)
    assert headers["x-ratelimit-remaining-tokens"] == "10" and "x-ratelimit-limit-requests" not in headers
    limiter.add_tokens(k.id, 6)
    await limiter.flush()
    assert (await limiter.check(k))["x-ratelimit-remaining-tokens"] == "4"
    limiter.add_tokens(k.id, 6)  # one answer may overshoot: usage is only known afterwards
    await limiter.flush()
    with pytest.raises(RateLimited) as refused:
        await limiter.check(k)
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "TPM" in refused.value.message and int(refused.value.headers["retry-after"]) >= 1


async def test_token_counts_for_many_keys_go_in_one_pipeline(make_limiter: MakeLimiter, prefix: str) -> None:
    limiter = make_limiter()
    keys = [key(tpm=1000) for _ in range(20)]
    for i, k in enumerate(keys):
        limiter.add_tokens(k.id, i + 1)
    await limiter.flush()
    async with Redis.from_url(REDIS_URL) as redis:
        counts = [int(await redis.hget(prefix + k.id, "tc") or 0) for k in keys]
    assert counts == list(range(1, 21))


async def test_pending_token_counts_are_bounded(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(max_pending_keys=2)
    for n, k in enumerate([key(tpm=100), key(tpm=100), key(tpm=100)], start=1):
        limiter.add_tokens(k.id, n)  # no await in between: the sender has not run yet
    await limiter.flush()
    assert limiter.tokens_dropped == 3


async def test_window_slides_instead_of_resetting_at_the_boundary(make_limiter: MakeLimiter) -> None:
    limiter, k = make_limiter(window_s=1.0), key(rpm=2)
    async with Redis.from_url(REDIS_URL) as redis:
        seconds, micros = await redis.time()
    await asyncio.sleep(1 - micros / 1e6 + 0.05)  # just after a window starts, by Redis's clock
    await limiter.check(k)
    await limiter.check(k)
    await asyncio.sleep(1.0)  # just after the next one starts: a fixed window would start afresh
    with pytest.raises(RateLimited) as refused:
        await limiter.check(k)
    wait = refused.value.headers["x-ratelimit-reset-requests"]
    assert wait.endswith("ms") or wait.endswith("s")
    await asyncio.sleep(0.6)  # half the previous window has slid out: 2 * 0.4 + 0 + 1 <= 2
    assert (await limiter.check(k))["x-ratelimit-remaining-requests"] == "0"


async def test_unlimited_key_never_touches_redis(make_limiter: MakeLimiter) -> None:
    counting = CountingRedis.from_url(REDIS_URL)
    limiter = make_limiter(redis=counting)
    free = key()
    for _ in range(50):
        assert await limiter.check(free) is NO_HEADERS
    assert counting.commands == 0
    await limiter.check(key(rpm=5))
    assert counting.commands == 1  # and a limited key costs exactly one round trip (EVALSHA)


async def test_redis_refusing_connections_fails_open_quickly(
        make_limiter: MakeLimiter, limiter_warnings: Callable[[], list[str]]) -> None:
    counting = CountingRedis.from_url(f"redis://127.0.0.1:{unused_port()}/0", socket_connect_timeout=0.25)
    limiter, k = make_limiter(redis=counting, backoff_s=10.0), key(rpm=1)
    started = time.perf_counter()
    for _ in range(100):
        assert await limiter.check(k) == {}
    assert time.perf_counter() - started < 0.25
    assert counting.commands == 1  # one refused attempt, then no Redis at all
    assert limiter.fail_open_total == 100 and limiter.outages == 1 and not limiter.available
    assert len(limiter_warnings()) == 1  # once per outage, not per request


async def test_hung_redis_costs_one_timeout_then_nothing(make_limiter: MakeLimiter) -> None:
    hung = TcpProxy("127.0.0.1", 9)
    hung.silent = True
    await hung.start()
    try:
        limiter, k = make_limiter(hung.url, timeout_s=0.1, backoff_s=10.0), key(rpm=1)
        started = time.perf_counter()
        assert await limiter.check(k) == {}
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(100):
            assert await limiter.check(k) == {}
        rest = time.perf_counter() - started
    finally:
        await hung.stop()
    assert 0.09 <= first < 0.5  # the timeout, not a hang
    assert rest < 0.05  # later requests do not wait on Redis at all (100 checks; slack for a busy box)
    limiter.add_tokens(k.id, 5)  # dropped while Redis is away: it would land in the wrong window later
    assert limiter.tokens_dropped == 5


async def test_limiter_reconnects_by_itself(make_limiter: MakeLimiter,
                                            limiter_warnings: Callable[[], list[str]]) -> None:
    proxy = TcpProxy("127.0.0.1", 6379)
    await proxy.start()
    try:
        limiter, k = make_limiter(proxy.url, backoff_s=0.1, max_backoff_s=0.2), key(rpm=1000)
        assert (await limiter.check(k))["x-ratelimit-remaining-requests"] == "999"
        await proxy.stop()
        for _ in range(20):
            assert await limiter.check(k) == {}
        await proxy.start()
        deadline = time.monotonic() + 3.0
        while not limiter.available and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert limiter.available
        assert (await limiter.check(k))["x-ratelimit-remaining-requests"] == "998"
    finally:
        await proxy.stop()
    assert limiter.outages == 1 and len(limiter_warnings()) == 1
