"""The one way the gateway builds a Redis client (rate limiter, response cache, semantic journal, key
revocations both ways, cooldowns both ways), and the one pub/sub listener (``ChannelListener``).

Every caller puts its own deadline on each call and fails open when Redis is away
(``serve_app/failopen.py``), so the client's job is to give up quickly: short timeouts, no retry loop of
its own, and a bounded pool, so that a slow Redis makes requests wait for a connection (and time out)
instead of each opening one more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from serve_app.background import cancel_and_wait
from serve_app.failopen import Backoff, FailOpen

logger = logging.getLogger(__name__)


def make_redis(url: str, *, timeout_s: float, max_connections: int = 64, retries: int = 0) -> Redis:
    """A client that owns its pool: ``await client.aclose()`` closes the connections too."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,  # wait this long for a free connection, then fail (open)
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        # One attempt by default: the caller's deadline is shorter than any retry loop, and the caller
        # knows what a failure means (a reconnecting listener must clear its cache, for one).
        retry=Retry(NoBackoff(), retries),
    )
    return Redis.from_pool(pool)


class ChannelListener:
    """One Redis pub/sub channel followed by one asyncio task: ``handle(message)`` for each message.

    When Redis is away it retries with capped, jittered backoff and warns once per outage; on
    reconnecting after a gap it calls ``on_reconnect`` (messages sent meanwhile were lost), and with
    ``reconnect_on_start`` on its first subscription too (to read the state already in force). Its own PINGs
    detect a silently dead connection (no RST), which a blocking read never would.
    """

    def __init__(self, redis_url: str, channel: str, *, what: str, while_away: str,
                 on_reconnect: Callable[[], Any] | None = None, reconnect_on_start: bool = False,
                 timeout_s: float = 1.0,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0, ping_interval_s: float = 5.0) -> None:
        self._redis_url = redis_url
        self._channel = channel
        self._on_reconnect = on_reconnect
        self._catch_up = reconnect_on_start  # call on_reconnect on the first subscription too
        self._timeout_s = timeout_s
        self._ping_interval_s = ping_interval_s
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._guard = FailOpen(
            logger, backoff=Backoff(backoff_s, max_backoff_s, jitter=True),
            lost=f"{what} lost Redis (%(error)s); retrying, {while_away}",
            back=f"{what} reconnected")
        self.failures = 0  # connection attempts that failed since start; for health output and tests

    def handle(self, data: str) -> None:
        raise NotImplementedError

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"iir-listener-{self._channel}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def wait_subscribed(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._subscribed.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    async def _run(self) -> None:
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Anything at all: this task must outlive every Redis or client-library failure.
                self.failures += 1
                self._guard.failed(exc)
            finally:
                self._subscribed.clear()
            await asyncio.sleep(self._guard.backoff.retry_in())

    async def _session(self) -> NoReturn:
        # No retries in the client: failures come to _run, which knows what a gap means.
        client = make_redis(self._redis_url, timeout_s=self._timeout_s)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel)
            after_gap = self._guard.succeeded()
            if (after_gap or self._catch_up) and self._on_reconnect is not None:
                result = self._on_reconnect()
                if asyncio.iscoroutine(result):
                    await result
                self._catch_up = False
            self._subscribed.set()
            await self._pump(pubsub)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _pump(self, pubsub: Any) -> NoReturn:
        last_seen = last_ping = time.monotonic()
        while True:
            msg = await pubsub.get_message(timeout=min(1.0, self._ping_interval_s))
            now = time.monotonic()
            if msg is not None:
                last_seen = now
                if msg.get("type") == "message":
                    data = msg.get("data")
                    self.handle(data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data))
            if now - last_seen > 3 * self._ping_interval_s:
                raise ConnectionError("no reply from Redis to PING")
            if now - last_ping >= self._ping_interval_s:
                last_ping = now
                await pubsub.ping()
