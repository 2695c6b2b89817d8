"""What rate limiting and usage accounting add to a request in the ingress, per call.

    .venv/bin/python -m bench.rate_limit_bench [--redis redis://127.0.0.1:6379/0] [-n 20000]

Times ``RateLimiter.check`` for a key without limits (no Redis), a limited key (one EVALSHA round trip
to the given Redis), and a limited key while Redis is away (fail open); the concurrent variant shows
what one ingress event loop gets through when many requests check at once; then the in-memory adds a
request makes after its response (``UsageRecorder.record``, ``RateLimiter.add_tokens``). Counters go
under a fresh prefix that is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from redis.asyncio import Redis

from serve_app.auth.keystore import KeyInfo
from serve_app.ingress.rate_limit import RateLimiter
from serve_app.ingress.usage_recorder import UsageRecorder, UsageRow
from serve_app.redis_client import make_redis


def _key(rpm: int | None, tpm: int | None) -> KeyInfo:
    return KeyInfo(id=str(uuid.uuid4()), prefix="iir-bench", description="", priority=0,
                   scopes=("inference",), created_at=datetime.now(UTC), expires_at=None, revoked_at=None,
                   rate_limit_rpm=rpm, rate_limit_tpm=tpm)


async def _per_call(fn: Callable[[], Awaitable[object]], n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        started = time.perf_counter_ns()
        await fn()
        samples.append((time.perf_counter_ns() - started) / 1000)
    samples.sort()
    return {"mean_us": round(statistics.fmean(samples), 2), "p50_us": round(samples[len(samples) // 2], 2),
            "p99_us": round(samples[int(len(samples) * 0.99)], 2)}


async def _concurrent(fn: Callable[[], Awaitable[object]], n: int, concurrency: int) -> float:
    async def worker() -> None:
        for _ in range(n // concurrency):
            await fn()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return round(n / (time.perf_counter() - started))


class _NullSink:
    async def record_usage(self, batch: list[UsageRow]) -> None:
        return None


async def main(redis_url: str, n: int) -> None:
    prefix = f"iir-bench:{uuid.uuid4().hex}:"
    limiter = RateLimiter(make_redis(redis_url, timeout_s=0.25), timeout_s=0.25, key_prefix=prefix)
    free, limited = _key(None, None), _key(10**9, 10**9)
    print("check, key without limits:", await _per_call(lambda: limiter.check(free), n))
    print("check, limited key (1 EVALSHA):", await _per_call(lambda: limiter.check(limited), n))
    print("checks/s on one event loop, limited key, 64 at a time:",
          await _concurrent(lambda: limiter.check(limited), n, 64))
    recorder = UsageRecorder(_NullSink())

    async def after_response() -> None:
        recorder.record(limited.id, prompt_tokens=10, completion_tokens=20)
        limiter.add_tokens(limited.id, 30)

    print("after the response (usage add + tokens add):", await _per_call(after_response, n))
    await limiter.flush()
    await limiter.aclose()
    away = RateLimiter(make_redis("redis://127.0.0.1:1/0", timeout_s=0.25), timeout_s=0.25, key_prefix=prefix)
    await away.check(limited)  # finds Redis away
    print("check, limited key, Redis away (fail open):", await _per_call(lambda: away.check(limited), n))
    await away.aclose()
    async with Redis.from_url(redis_url) as redis:
        stale = [k async for k in redis.scan_iter(match=prefix + "*")]
        if stale:
            await redis.delete(*stale)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("-n", type=int, default=20_000)
    args = parser.parse_args()
    asyncio.run(main(args.redis, args.n))
