"""Fail-open use of Redis, shared by the rate limiter and the response cache.

On the first failure or timeout the breaker opens: callers skip Redis at once (no waiting on a dead
server) and one warning is logged. A background task PINGs with backoff (jittered, so replicas that
lost Redis together do not probe in lockstep) and closes the breaker when Redis answers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from redis.asyncio import Redis

from serve_app.tasks import cancel_and_wait


class RedisBreaker:
    def __init__(self, redis: Redis, *, timeout_s: float, logger: logging.Logger, lost_message: str,
                 back_message: str, backoff_s: float = 0.5, max_backoff_s: float = 5.0) -> None:
        self._redis = redis
        self._timeout_s = timeout_s
        self._logger = logger
        self._lost_message = lost_message  # "%s" takes the error
        self._back_message = back_message  # "%.1f" takes the outage's seconds
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._probe: asyncio.Task[None] | None = None
        self.available = True
        self.outages = 0

    def lost(self, exc: BaseException) -> None:
        if not self.available:
            return
        self.available = False
        self.outages += 1
        self._logger.warning(self._lost_message, describe(exc))
        self._probe = asyncio.create_task(self._recover(), name="iir-redis-probe")

    async def aclose(self) -> None:
        probe, self._probe = self._probe, None
        await cancel_and_wait(probe)

    async def _recover(self) -> None:
        started = time.monotonic()
        delay = self._backoff_s
        while True:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._redis.ping()
            except Exception:
                delay = min(delay * 2, self._max_backoff_s)
                continue
            self.available = True
            self._logger.info(self._back_message, time.monotonic() - started)
            return


def describe(exc: BaseException) -> str:
    text = str(exc).partition("\n")[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
