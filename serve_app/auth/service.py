"""The async face of the key store: what the Auth deployment wraps.

Every database call runs in a worker thread under a deadline, and every database failure becomes
``ServiceUnavailable`` (503): callers see a clear, prompt error, never a hang or a 500. Revocations and
updates are announced on Redis so that ingress caches drop the key at once (and re-verify it, picking up
a new priority or limit); Redis is best-effort here, because the caches' TTL bounds how long a missed
announcement matters.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from serve_app.auth.keystore import UNSET, KeyInfo, KeyStore, Unset
from serve_app.auth.usage_store import UsageDelta
from serve_app.db.engine import utcnow
from serve_app.errors import InvalidRequest, ServiceUnavailable
from serve_app.redis_client import make_redis
from serve_app.schemas import ApiKeyCreate, RateLimit

logger = logging.getLogger(__name__)

REVOKED_CHANNEL = "iir:keys:revoked"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class KeyChange:
    """A revocation or update as committed, and whether Redis took its announcement. ``announced``
    False: the change stands, but ingress caches that hold the key keep it until their TTL runs out."""

    info: KeyInfo
    announced: bool


class AuthService:
    def __init__(
        self,
        store: KeyStore,
        *,
        redis_url: str | None,
        redis_timeout_s: float,
        db_timeout_s: float = 5.0,
        revoked_channel: str = REVOKED_CHANNEL,
    ) -> None:
        self._store = store
        self._redis_url = redis_url
        self._redis_timeout_s = redis_timeout_s
        self._db_timeout_s = db_timeout_s
        self._channel = revoked_channel
        self._redis: Redis | None = None

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        # wait_for releases the caller even if a driver ignores its own timeouts; the thread finishes alone.
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), self._db_timeout_s)
        except (SQLAlchemyError, TimeoutError, OSError) as exc:
            # One line per failure: during an outage every miss lands here, and a traceback each is noise.
            logger.warning("key store unavailable: %s", str(exc).partition("\n")[0] or type(exc).__name__)
            raise ServiceUnavailable("The API key store is unavailable; try again shortly.") from None

    async def create(self, request: ApiKeyCreate) -> dict[str, Any]:
        # expires_in is relative, so only the server's clock decides when the key ends (no client skew).
        expires_at = utcnow() + timedelta(seconds=request.expires_in) if request.expires_in else None
        limits = request.rate_limit or RateLimit()
        create = partial(self._store.create, request.description, request.priority, request.scopes,
                         expires_at, rate_limit_rpm=limits.requests_per_minute,
                         rate_limit_tpm=limits.tokens_per_minute)
        try:
            api_key, info = await self._db(create)
        except ValueError as exc:  # unknown scope, out-of-range value: the caller's mistake, not ours
            raise InvalidRequest(str(exc)) from None
        logger.info("created API key id=%s prefix=%s", info.id, info.prefix)
        return {**info.to_public(), "api_key": api_key}

    async def verify(self, api_key: str) -> KeyInfo | None:
        return await self._db(self._store.verify, api_key)

    async def get(self, key_id: str) -> KeyInfo:
        return await self._db(self._store.get, key_id)

    async def list(self) -> builtins.list[KeyInfo]:
        return await self._db(self._store.list)

    async def update(
        self,
        key_id: str,
        *,
        description: str | Unset = UNSET,
        priority: int | Unset = UNSET,
        rate_limit_rpm: int | None | Unset = UNSET,
        rate_limit_tpm: int | None | Unset = UNSET,
    ) -> KeyChange:
        """Change a key; every ingress drops its cached copy at once and re-verifies on the next use."""
        change = partial(self._store.update, key_id, description=description, priority=priority,
                         rate_limit_rpm=rate_limit_rpm, rate_limit_tpm=rate_limit_tpm)
        try:
            info = await self._db(change)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        logger.info("updated API key id=%s prefix=%s", info.id, info.prefix)
        # The revocation channel means "drop this key from your cache", which is what a change needs too:
        # the next request re-verifies and picks up the new priority and limits.
        return KeyChange(info, await self._announce(info, "update"))

    async def revoke(self, key_id: str) -> KeyChange:
        # Announced even when the key was already revoked: running a revocation again after a Redis
        # outage is how an operator gets the message out.
        info = await self._db(self._store.revoke, key_id)
        logger.info("revoked API key id=%s prefix=%s", info.id, info.prefix)
        return KeyChange(info, await self._announce(info, "revocation"))

    async def usage(self, key_id: str) -> dict[str, Any]:
        return await self._db(self._store.usage, key_id)

    async def record_usage(self, batch: Sequence[UsageDelta | tuple[Any, ...]]) -> int:
        """Add a batch of per-key counts. A ServiceUnavailable means the batch may or may not have been
        applied (a timeout leaves the worker thread running); the caller decides whether to retry."""
        try:
            return await self._db(self._store.record_usage, batch)
        except (ValueError, TypeError) as exc:  # a malformed entry: a bug in the caller, not an outage
            raise InvalidRequest(f"bad usage batch: {exc}") from None

    async def ping(self) -> None:
        """For the deployment's health check: raises ServiceUnavailable when the database is away."""
        await self._db(self._store.ping)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def _announce(self, info: KeyInfo, change: str) -> bool:
        """Best effort: True if Redis took the message. The DB row is already changed either way."""
        if self._redis_url is None:
            return False
        try:
            redis = self._client()
            await asyncio.wait_for(redis.publish(self._channel, info.key_hash), self._redis_timeout_s)
            return True
        except (RedisError, TimeoutError, OSError) as exc:
            logger.warning(
                "could not announce %s of key id=%s on Redis (%s); ingress caches will drop it "
                "when their TTL expires",
                change,
                info.id,
                type(exc).__name__,
            )
            return False

    def _client(self) -> Redis:
        if self._redis is None:
            assert self._redis_url is not None
            self._redis = make_redis(self._redis_url, timeout_s=self._redis_timeout_s)
        return self._redis
