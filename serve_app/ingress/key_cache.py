"""The ingress's verified-key cache: after a key's first use, auth costs a hash and a dict lookup.

    authenticate(header) ─▶ parse "Bearer <key>" ─▶ sha256 ─▶ fresh hit?        ─▶ KeyInfo
                                                           ─▶ recent known miss? ─▶ 401
                                                           ─▶ verifier.verify (one call per key at a time)

Entries are keyed by the key's hash, so the cache never holds a key. Both maps are bounded LRUs (an
attacker cycling random keys can fill the miss map, not memory). A hit lives ``ttl_s`` at most, and less
if the key expires sooner. Revocations arrive through ``RevocationListener`` (Redis pub/sub) within
milliseconds; the TTL is the backstop for a missed message. Failure policy: when the verifier is
unavailable, cached keys keep working (for ``stale_if_error_s`` past their TTL too, if set) and unknown
keys get the verifier's 503, never a 401 that would tell a valid caller their key is wrong.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from serve_app.auth.keystore import MAX_KEY_CHARS, KeyInfo, hash_key
from serve_app.auth.service import REVOKED_CHANNEL
from serve_app.errors import AuthenticationFailed, IIRError, ServiceUnavailable
from serve_app.redis_client import ChannelListener

logger = logging.getLogger(__name__)

MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
MALFORMED_HEADER = (
    "Malformed Authorization header. Provide your API key using Bearer auth "
    "(i.e. Authorization: Bearer YOUR_KEY)."
)
INVALID_KEY = "Incorrect API key provided. Check the key, or ask your administrator for a new one."
ALL_KEYS = "*"  # a revocation message meaning "drop everything"


class KeyVerifier(Protocol):
    async def verify(self, api_key: str) -> KeyInfo | None: ...


@dataclass(slots=True)
class _Entry:
    info: KeyInfo
    fresh_until: float  # monotonic; re-verify after this
    usable_until: float  # monotonic; may still answer while the verifier is down


def bearer_token(authorization: str | None) -> str:
    """The key from an ``Authorization`` header, or AuthenticationFailed saying what is wrong."""
    if authorization is None or not authorization.strip():
        raise AuthenticationFailed(MISSING_KEY, reason="missing_key")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    well_formed = 0 < len(token) <= MAX_KEY_CHARS and not any(c.isspace() for c in token)
    if scheme.lower() != "bearer" or not well_formed:
        raise AuthenticationFailed(MALFORMED_HEADER, reason="malformed_header")
    return token


class VerifiedKeyCache:
    def __init__(
        self,
        verifier: KeyVerifier,
        *,
        ttl_s: float,
        max_size: int,
        negative_ttl_s: float,
        negative_max_size: int,
        stale_if_error_s: float = 0.0,
    ) -> None:
        self._verifier = verifier
        self._ttl_s = ttl_s
        self._max_size = max_size
        self._negative_ttl_s = negative_ttl_s
        self._negative_max_size = negative_max_size
        self._stale_if_error_s = stale_if_error_s
        self._hits: OrderedDict[str, _Entry] = OrderedDict()
        self._misses: OrderedDict[str, float] = OrderedDict()  # key hash -> monotonic expiry
        self._in_flight: dict[str, asyncio.Task[KeyInfo | None]] = {}
        # Bumped by every invalidation: a verify that started before one must not repopulate the cache
        # with what it read before the revocation committed.
        self._epoch = 0

    async def authenticate(self, authorization_header: str | None) -> KeyInfo:
        api_key = bearer_token(authorization_header)
        key_hash = hash_key(api_key)
        now = time.monotonic()
        entry = self._hits.get(key_hash)
        if entry is not None and now < entry.fresh_until:
            self._hits.move_to_end(key_hash)
            return entry.info
        if entry is None and self._known_miss(key_hash, now):
            raise AuthenticationFailed(INVALID_KEY, reason="invalid_key")
        try:
            info = await self._verify_once(api_key, key_hash)
        except ServiceUnavailable:
            if entry is not None and now < entry.usable_until:
                return entry.info
            raise
        if info is None:
            raise AuthenticationFailed(INVALID_KEY, reason="invalid_key")
        return info

    def invalidate(self, key_hash: str) -> None:
        self._epoch += 1
        self._hits.pop(key_hash, None)

    def invalidate_all(self) -> None:
        self._epoch += 1
        self._hits.clear()
        self._misses.clear()

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._hits),
            "negative_entries": len(self._misses),
            "in_flight": len(self._in_flight),
        }

    def _known_miss(self, key_hash: str, now: float) -> bool:
        expiry = self._misses.get(key_hash)
        if expiry is None:
            return False
        if now >= expiry:
            del self._misses[key_hash]
            return False
        return True

    async def _verify_once(self, api_key: str, key_hash: str) -> KeyInfo | None:
        """Single flight: concurrent first uses of one key share one verify call."""
        task = self._in_flight.get(key_hash)
        if task is None:
            task = asyncio.create_task(self._fetch(api_key, key_hash))
            self._in_flight[key_hash] = task
            task.add_done_callback(lambda t: self._fetch_done(key_hash, t))
        # shield: one caller giving up (client disconnect) must not cancel the others' lookup
        return await asyncio.shield(task)

    def _fetch_done(self, key_hash: str, task: asyncio.Task[KeyInfo | None]) -> None:
        if self._in_flight.get(key_hash) is task:
            del self._in_flight[key_hash]
        if not task.cancelled():
            task.exception()  # mark retrieved even if every waiter was cancelled

    async def _fetch(self, api_key: str, key_hash: str) -> KeyInfo | None:
        epoch = self._epoch
        try:
            info = await self._verifier.verify(api_key)
        except IIRError:
            raise
        except Exception as exc:
            # e.g. the Auth deployment is restarting: availability trouble, never a 500 or a 401
            logger.warning("key verification failed: %s", type(exc).__name__, exc_info=True)
            raise ServiceUnavailable("Authentication is temporarily unavailable; try again.") from None
        if epoch == self._epoch:
            self._remember(key_hash, info)
        return info

    def _remember(self, key_hash: str, info: KeyInfo | None) -> None:
        now = time.monotonic()
        if info is None or not info.active:
            self._hits.pop(key_hash, None)
            if self._negative_ttl_s > 0:
                self._misses[key_hash] = now + self._negative_ttl_s
                self._misses.move_to_end(key_hash)
                while len(self._misses) > self._negative_max_size:
                    self._misses.popitem(last=False)
            return
        fresh = now + self._ttl_s
        usable = fresh + self._stale_if_error_s
        if info.expires_at is not None:
            # Never serve a key from cache past its own expiry, stale or not.
            ends = now + (info.expires_at - datetime.now(UTC)).total_seconds()
            fresh, usable = min(fresh, ends), min(usable, ends)
        self._misses.pop(key_hash, None)
        self._hits[key_hash] = _Entry(info, fresh, usable)
        self._hits.move_to_end(key_hash)
        while len(self._hits) > self._max_size:
            self._hits.popitem(last=False)


class RevocationListener(ChannelListener):
    """Subscribes to the revocation channel and drops announced keys from a cache; on reconnecting it
    clears the cache, since revocations sent meanwhile were lost."""

    def __init__(self, cache: VerifiedKeyCache, redis_url: str, *, channel: str = REVOKED_CHANNEL,
                 **options: Any) -> None:
        super().__init__(redis_url, channel, what="revocation listener",
                         while_away="cached keys fall back to their TTL",
                         on_reconnect=cache.invalidate_all, **options)
        self._cache = cache

    def handle(self, data: str) -> None:
        key_hash = data
        if key_hash == ALL_KEYS:
            self._cache.invalidate_all()
        else:
            self._cache.invalidate(key_hash)
