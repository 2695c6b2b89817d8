"""The one way the gateway builds a Redis client (rate limiter, response cache, semantic journal, key
revocations both ways).

Every caller puts its own deadline on each call and fails open when Redis is away
(``serve_app/failopen.py``), so the client's job is to give up quickly: short timeouts, no retry loop of
its own, and a bounded pool, so that a slow Redis makes requests wait for a connection (and time out)
instead of each opening one more.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


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
