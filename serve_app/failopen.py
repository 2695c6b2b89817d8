"""Failing open: when something the gateway can do without fails, requests go on without it, and it is
skipped for a while, so an outage costs one timeout rather than one per request.

Going on without it means, per dependency:

- **rate limiter** (Redis): the request is allowed, unchecked and without ``x-ratelimit-*`` headers;
- **response cache** (Redis) and its **semantic lookups**: a miss (``x-iir-cache: bypass``), the model
  answers; the **semantic journal** (Redis) keeps its entries in memory only;
- **revocation listener** (Redis pub/sub): cached keys fall back to their TTL, and the cache is cleared
  on reconnecting, since the revocations sent meanwhile were lost;
- **classifier**: ``auto`` takes the routing policy's default route;
- **usage recorder** (the Auth deployment's database): the tallies stay in memory (bounded) and the
  flush is retried;
- **registry follower**: the replica keeps the last snapshot it has and polls again.

``Backoff`` is the pause after a failure: ``first_s``, doubled by each further failure up to ``max_s``,
optionally jittered (× 0.5–1.0, so replicas that lost a dependency together do not retry in lockstep).

``FailOpen`` is one dependency's outage: ``failed(exc)`` starts it (one warning) or extends it,
``paused()`` tells callers to skip the dependency now, ``succeeded()`` ends it (one info line). Without
a probe, the first call after a pause is the test; with one (a Redis PING), callers skip the dependency
until a background probe, retried with the backoff, gets an answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from serve_app.background import cancel_and_wait


class Backoff:
    """Paused for ``first_s`` after a failure, doubling with each further failure up to ``max_s``; a
    success starts again from ``first_s``."""

    def __init__(self, first_s: float = 1.0, max_s: float = 30.0, *, jitter: bool = False) -> None:
        self.first_s, self.max_s, self.jitter = min(first_s, max_s), max_s, jitter
        self.pause_s = self.first_s  # the pause the next failure starts (before jitter)
        self.paused_until = 0.0  # monotonic

    def paused(self) -> bool:
        return time.monotonic() < self.paused_until

    def retry_in(self) -> float:
        """Seconds left of the current pause."""
        return max(0.0, self.paused_until - time.monotonic())

    def failed(self) -> float:
        """Start a pause; its length in seconds."""
        pause_s = self.pause_s * random.uniform(0.5, 1.0) if self.jitter else self.pause_s
        self.paused_until = time.monotonic() + pause_s
        self.pause_s = min(self.pause_s * 2, self.max_s)
        return pause_s

    def succeeded(self) -> None:
        self.pause_s = self.first_s
        self.paused_until = 0.0


class FailOpen:
    """The outage state of one dependency, logged on ``logger``.

    ``lost`` and ``back`` are the two log lines of an outage, formatted with a mapping: ``lost`` may use
    ``%(error)s`` and ``%(pause_s)f`` (the pause this failure starts), ``back`` ``%(seconds)f`` (the
    outage's length) and ``%(failures)d`` (failed attempts in it).
    """

    def __init__(self, logger: logging.Logger, *, lost: str, back: str, backoff: Backoff | None = None,
                 probe: Callable[[], Awaitable[object]] | None = None, probe_timeout_s: float = 1.0,
                 log_traceback: bool = False) -> None:
        self.backoff = backoff or Backoff()
        self._logger = logger
        self._lost, self._back = lost, back
        self._probe = probe
        self._probe_timeout_s = probe_timeout_s
        self._log_traceback = log_traceback  # for failures that may be bugs rather than outages
        self._prober: asyncio.Task[None] | None = None
        self._since = 0.0  # monotonic start of the outage
        self.available = True  # no outage
        self.outages = 0
        self.failures = 0  # failed attempts in the current outage

    def paused(self) -> bool:
        """Skip the dependency now: until the probe succeeds, or (without one) during a pause."""
        return not self.available and (self._probe is not None or self.backoff.paused())

    def failed(self, exc: BaseException) -> float:
        """Count a failure; seconds until the dependency is worth trying again."""
        self.failures += 1
        if not self.available and self._probe is not None:
            return self.backoff.retry_in()  # a call that was under way when the outage began
        pause_s = self.backoff.failed()
        if self.available:
            self.available = False
            self.outages += 1
            self._since = time.monotonic()
            self._logger.warning(self._lost, {"error": describe(exc), "pause_s": pause_s},
                                 exc_info=exc if self._log_traceback else None)
            if self._probe is not None:
                self._prober = asyncio.create_task(self._recover(), name="iir-failopen-probe")
        return pause_s

    def succeeded(self) -> bool:
        """End the outage; True if there was one. With a probe, only the probe calls this."""
        if self.available:
            return False
        self.available = True
        self.backoff.succeeded()
        self._logger.info(self._back, {"seconds": time.monotonic() - self._since, "failures": self.failures})
        self.failures = 0
        return True

    async def aclose(self) -> None:
        prober, self._prober = self._prober, None
        await cancel_and_wait(prober)

    async def _recover(self) -> None:
        assert self._probe is not None
        while True:
            await asyncio.sleep(self.backoff.retry_in())
            try:
                async with asyncio.timeout(self._probe_timeout_s):
                    await self._probe()
            except Exception:
                self.failures += 1
                self.backoff.failed()
                continue
            self.succeeded()
            return


def describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (just ``Type`` when it has none, as a timeout)."""
    text = str(exc).partition("\n")[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
