"""Per-key rate limits in Redis: requests/minute and tokens/minute, checked in one round trip.

    check(key) ── key has no limits ────▶ no headers                  (Redis never touched)
               ── Redis known to be away ▶ no headers, counted        (fail open, see below)
               ── EVALSHA check script ──▶ x-ratelimit-* headers, or RateLimited (429) + Retry-After
    add_tokens(key_id, n)  after the response: an in-memory add; one background task sends all
                           pending counts in one pipeline

**Window**: a sliding 60 s window, approximated the usual way (Cloudflare, the Redis docs): a counter
for the current fixed minute and one for the previous minute, weighted by how much of the previous
minute the window still covers: ``used = previous × (60 s − elapsed) / 60 s + current``. A fixed
window lets a client send twice its limit across a minute boundary; this one does not (it is exact when
the previous minute's traffic was spread evenly), and it costs one small hash per key that expires two
minutes after the key's last use.

**Atomicity**: the check script reads the key's hash, rolls the windows by Redis's own clock (``TIME``,
so ingress replicas on different hosts agree), refuses if either the requests or the tokens are used
up, and otherwise counts the request, all in one script. A refused request is not counted, so a client
that keeps retrying still gets through once the window has moved.

**Tokens** are known only after the response, so a request is admitted while its key has at least one
token left, and its real usage is added afterwards. One large answer can overshoot the limit; the
overshoot then holds back the key's next requests until it has slid out of the window. (OpenAI
estimates a request's tokens up front from ``max_tokens``; the ingress has no tokenizer, and counting
what was really used never refuses a request for tokens it would not have spent.)

**Failure policy: fail open.** When Redis errors or does not answer within ``timeout_s``, the request
goes through unchecked and without rate-limit headers. The first failure marks Redis as away, logs one
warning, and starts a background probe (PING with jittered, capped backoff); until the probe succeeds
every request skips Redis at once, so an outage costs at most one timeout per request that was already
waiting on Redis. Token counts that arrive during an outage are dropped (counted): they would
land in the wrong window by the time Redis is back. ``fail_open_total``, ``outages`` and
``tokens_dropped`` are there for the metrics module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from redis.asyncio import Redis

from serve_app import metrics
from serve_app.auth.keystore import KeyInfo
from serve_app.errors import RateLimited
from serve_app.failopen import Backoff, FailOpen

logger = logging.getLogger(__name__)

NO_HEADERS: Mapping[str, str] = MappingProxyType({})

# Rolls the key's hash {w: minute index, rc/rp: requests this/previous minute, tc/tp: tokens} to now.
_ROLL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local current = math.floor(now / window)
local h = redis.call('HMGET', KEYS[1], 'w', 'rc', 'rp', 'tc', 'tp')
local rc, rp = tonumber(h[2]) or 0, tonumber(h[3]) or 0
local tc, tp = tonumber(h[4]) or 0, tonumber(h[5]) or 0
local stored = tonumber(h[1])
if stored ~= current then
  if stored == current - 1 then rp, tp = rc, tc else rp, tp = 0, 0 end
  rc, tc = 0, 0
end
local function save()
  redis.call('HSET', KEYS[1], 'w', current, 'rc', rc, 'rp', rp, 'tc', tc, 'tp', tp)
  redis.call('PEXPIRE', KEYS[1], 2 * window)
end
"""

# ARGV: window_ms, requests limit, tokens limit (-1: none). Returns {admitted, elapsed_ms, rc, rp, tc, tp}.
_CHECK = _ROLL + """
local elapsed = now - current * window
local weight = (window - elapsed) / window
local rpm, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
local ok = 1
if rpm >= 0 and rp * weight + rc + 1 > rpm then ok = 0 end
if tpm >= 0 and tp * weight + tc + 1 > tpm then ok = 0 end
if ok == 1 then
  rc = rc + 1
  save()
end
return {ok, elapsed, rc, rp, tc, tp}
"""

# ARGV: window_ms, tokens to add.
_ADD_TOKENS = _ROLL + """
tc = tc + tonumber(ARGV[2])
save()
return 1
"""


class RateLimiter:
    def __init__(
        self,
        redis: Redis,
        *,
        timeout_s: float,
        key_prefix: str = "iir:rl:",
        window_s: float = 60.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 5.0,
        max_pending_keys: int = 10_000,
    ) -> None:
        self._redis = redis
        self._check = redis.register_script(_CHECK)
        self._add = redis.register_script(_ADD_TOKENS)
        self._timeout_s = timeout_s
        self._prefix = key_prefix
        self._window_ms = round(window_s * 1000)
        self._max_pending_keys = max_pending_keys
        self._guard = FailOpen(
            logger, probe=redis.ping, probe_timeout_s=timeout_s,
            backoff=Backoff(backoff_s, max_backoff_s, jitter=True),
            lost="rate limits are not enforced: Redis unavailable (%(error)s); requests pass unchecked "
                 "until it is back",
            back="Redis is back after %(seconds).1f s; rate limits are enforced again")
        self._pending: dict[str, int] = {}  # key id -> tokens not yet sent to Redis
        self._sender: asyncio.Task[None] | None = None
        # For the metrics module and tests.
        self.fail_open_total = 0  # requests let through unchecked because Redis was away
        self.tokens_dropped = 0

    @property
    def available(self) -> bool:
        return self._guard.available

    @property
    def outages(self) -> int:
        return self._guard.outages

    async def check(self, key: KeyInfo) -> Mapping[str, str]:
        """Count one request for ``key``: its ``x-ratelimit-*`` headers, or RateLimited (429)."""
        rpm, tpm = key.rate_limit_rpm, key.rate_limit_tpm
        if rpm is None and tpm is None:
            return NO_HEADERS
        if self._guard.paused():
            self.fail_open_total += 1
            metrics.REDIS_FAIL_OPEN.inc(component="rate_limit")
            return NO_HEADERS
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await self._check(keys=[self._prefix + key.id],
                                          args=[self._window_ms, _arg(rpm), _arg(tpm)])
        except Exception as exc:  # any failure at all, client-library bugs included: fail open, loudly
            self._guard.failed(exc)
            self.fail_open_total += 1
            metrics.REDIS_FAIL_OPEN.inc(component="rate_limit")
            return NO_HEADERS
        return _verdict(reply, rpm, tpm, self._window_ms)

    def add_tokens(self, key_id: str, n: int) -> None:
        """Count tokens a key used; sent to Redis by a background task, never awaited by the caller."""
        if n <= 0:
            return
        if not self._guard.available or (key_id not in self._pending
                                         and len(self._pending) >= self._max_pending_keys):
            self.tokens_dropped += n
            return
        self._pending[key_id] = self._pending.get(key_id, 0) + n
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_tokens(), name="iir-rate-limit-tokens")

    async def flush(self) -> None:
        """Wait until the token counts added so far have been sent (or dropped)."""
        if self._sender is not None:
            await asyncio.shield(self._sender)

    async def aclose(self) -> None:
        await self._guard.aclose()
        with contextlib.suppress(Exception):
            await self.flush()
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()

    def stats(self) -> dict[str, int]:
        return {"available": int(self.available), "fail_open_total": self.fail_open_total,
                "outages": self.outages, "tokens_dropped": self.tokens_dropped,
                "tokens_pending_keys": len(self._pending)}

    async def _send_tokens(self) -> None:
        # One task at a time: under load, counts for many keys pile up while a pipeline is in flight
        # and go together in the next one.
        while self._pending:
            batch, self._pending = self._pending, {}
            if not self._guard.available:
                self.tokens_dropped += sum(batch.values())
                continue
            try:
                async with asyncio.timeout(self._timeout_s):
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for key_id, n in batch.items():
                            await self._add(keys=[self._prefix + key_id], args=[self._window_ms, n],
                                            client=pipe)
                        await pipe.execute()
            except Exception as exc:
                self.tokens_dropped += sum(batch.values())
                self._guard.failed(exc)


def _arg(limit: int | None) -> int:
    return -1 if limit is None else limit


def _verdict(reply: Sequence[Any], rpm: int | None, tpm: int | None, window_ms: int) -> Mapping[str, str]:
    admitted, elapsed, rc, rp, tc, tp = (int(v) for v in reply)
    headers: dict[str, str] = {}
    waits: list[tuple[int, str, int, float]] = []
    for kind, limit, current, previous in (("requests", rpm, rc, rp), ("tokens", tpm, tc, tp)):
        if limit is None:
            continue
        used = _used(current, previous, elapsed, window_ms)
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(limit - used)))
        headers[f"x-ratelimit-reset-{kind}"] = duration(_reset_ms(current, previous, elapsed, window_ms))
        if not admitted:
            waits.append((_wait_ms(limit, current, previous, elapsed, window_ms), kind, limit, used))
    if admitted:
        return headers
    wait_ms, kind, limit, used = max(waits)
    headers["retry-after"] = str(max(1, math.ceil(wait_ms / 1000)))
    unit = "RPM" if kind == "requests" else "TPM"
    raise RateLimited(
        f"Rate limit reached for {kind} per minute ({unit}) on this API key: Limit {limit}, "
        f"Used {math.ceil(used)}, Requested 1. Please try again in {duration(wait_ms)}.",
        headers=headers, reason=kind,
    )


def _used(current: int, previous: int, elapsed_ms: int, window_ms: int) -> float:
    """The sliding window's count: all of this minute, and the share of the last still inside it."""
    return previous * (window_ms - elapsed_ms) / window_ms + current


def _wait_ms(limit: int, current: int, previous: int, elapsed_ms: int, window_ms: int) -> int:
    """How long until one more unit fits under ``limit`` (0 if it fits now)."""
    left = window_ms - elapsed_ms
    if limit < 1:
        return window_ms  # nothing is ever allowed; tell the client to come back, not to hammer
    if _used(current, previous, elapsed_ms, window_ms) + 1 <= limit:
        return 0
    if current + 1 <= limit:
        # Fits within this minute once enough of the previous one has slid out (previous > 0 here).
        return math.ceil(left - (limit - 1 - current) * window_ms / previous)
    # Not this minute: wait for it to end and then for enough of it to slide out.
    return math.ceil(left + window_ms * (current + 1 - limit) / current)


def _reset_ms(current: int, previous: int, elapsed_ms: int, window_ms: int) -> int:
    """How long until the key is back to its full allowance (OpenAI's ``x-ratelimit-reset-*``)."""
    left = window_ms - elapsed_ms
    if current:
        return left + window_ms
    return left if previous else 0


def duration(ms: int) -> str:
    """A duration the way OpenAI writes ``x-ratelimit-reset-*``: ``20ms``, ``1.5s``, ``6m0s``."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    minutes, rest_ms = divmod(ms, 60_000)
    seconds = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"
