"""Exact response cache: a repeated deterministic request is answered without calling the model.

- **Key**: SHA-256 of everything that can change the answer: the namespace (the API key's id, or one
  global namespace with ``IIR_CACHE_SCOPE=global``), the model *after* routing, the endpoint, and the
  whole request body except ``model`` and ``user`` (messages, sampling parameters, tools,
  response_format, stream and stream_options, any extra field). Unknown fields are kept, so two
  requests share an entry only when they are the same request.
- **When**: only deterministic requests (``temperature: 0``, or a ``seed``), or when the caller opts
  in with ``x-iir-cache: on``. ``Cache-Control: no-cache`` skips the lookup (the fresh answer is
  stored); ``no-store`` skips both. A model's ``cache_ttl_s`` (models.yaml) overrides
  ``IIR_CACHE_TTL_S``; 0 turns caching off for it.
- **What**: a JSON answer as itself, a stream as its chunks, stored after the answer went out and only
  if it completed: errors, cut streams and client disconnects are never stored. A streamed hit is
  replayed as a proper SSE stream ending in ``[DONE]``.
- **Usage on a hit**: the body keeps the original answer's ``usage`` (what it cost to produce); the
  key is charged one request and no tokens, since no model ran. Responses say
  ``x-iir-cache: hit | miss | bypass``.
- **Hot entries in the ingress**: each ingress replica keeps the entries it recently read or stored in
  memory (``IIR_CACHE_LOCAL_MAX_BYTES``, 32 MiB by default; 0 turns it off), so a repeated request is
  answered without a Redis round trip (issue 13: an exact hit at c=1 through port 8000 went from ~4 ms
  to under 3). An entry carries its own expiry, which the copy keeps; the copy also lives at most
  ``IIR_CACHE_LOCAL_TTL_S`` (10 s), so an entry re-stored by another replica (``Cache-Control:
  no-cache``) reaches this one within that. Only while Redis is available: when it is away the
  cache is off (``bypass``) as before.
- **Fail-open**: every Redis call has ``IIR_CACHE_TIMEOUT_S`` (0.1 s); a failure opens a ``FailOpen``
  guard (``serve_app/failopen.py``) and requests go on without the cache (``bypass``) until a
  background PING finds Redis again. ``/ready`` reports it. Without Redis at start (the embedded
  default), an in-process LRU serves instead, and the log says so.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from redis.asyncio import Redis

from serve_app import metrics
from serve_app.cache.semantic import CacheTarget, Probe, SemanticLookup, SemanticQuery, semantic_query
from serve_app.failopen import Backoff, FailOpen, describe
from serve_app.redis_client import make_redis
from serve_app.schemas import GenerateRequest

logger = logging.getLogger(__name__)

HEADER = "x-iir-cache"
MATCH_HEADER = "x-iir-cache-match"  # on a hit: exact | semantic
SIMILARITY_HEADER = "x-iir-cache-similarity"  # on a semantic hit: the cosine similarity
Outcome = Literal["hit", "miss", "bypass"]


class ResponseStore(Protocol):
    name: str

    @property
    def available(self) -> bool: ...
    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_s: int) -> None: ...
    async def delete(self, key: str) -> bool: ...
    def status(self) -> str: ...
    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class Lookup:
    key: str | None  # None: this request is not cached
    read: bool
    ttl_s: int
    why: str
    semantic: SemanticQuery | None = None  # set when a paraphrase may answer it too


@dataclass(frozen=True)
class Found:
    outcome: Outcome
    entry: dict[str, Any] | None = None
    match: Literal["exact", "semantic"] | None = None
    similarity: float | None = None
    probe: Probe | None = None  # a semantic miss: what ``put_later`` adds to the index


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    bypasses: int = 0
    errors: int = 0  # Redis failures and timeouts (requests then go on without the cache)
    stored: int = 0
    semantic_hits: int = 0  # also counted in hits
    semantic_errors: int = 0


class HotEntries:
    """Recently used entries, decoded, in this process: an LRU bounded in bytes (their encoded size).

    Entries are shared between the requests that hit them: read-only.
    """

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self._entries: OrderedDict[str, tuple[float, int, dict[str, Any]]] = OrderedDict()
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._bytes = 0

    def get(self, key: str) -> dict[str, Any] | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, _, entry = found
        if expires <= time.time():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: dict[str, Any], size: int) -> None:
        expires = min(float(entry.get("expires_at", 0)), time.time() + self._ttl_s)
        if size > self._max_bytes or expires <= time.time():
            return
        self._drop(key)
        self._entries[key] = (expires, size, entry)
        self._bytes += size
        while self._bytes > self._max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self._bytes -= found[1]


class ResponseCache:
    def __init__(self, store: ResponseStore, *, scope: Literal["key", "global"], default_ttl_s: int,
                 max_entry_bytes: int, stats: CacheStats | None = None, prefix: str = "iir:rc:",
                 semantic: SemanticLookup | None = None, semantic_timeout_s: float = 0.25,
                 local_max_bytes: int = 0, local_ttl_s: float = 10.0) -> None:
        self.store = store
        # An in-process store already is local: no second copy in front of it.
        self._hot = HotEntries(local_max_bytes, local_ttl_s) \
            if local_max_bytes > 0 and not isinstance(store, MemoryResponseStore) else None
        self._semantic = semantic
        self._semantic_timeout_s = semantic_timeout_s
        # A dead index costs one timeout, then lookups are skipped for a while (1 s, doubling to 30 s).
        self._semantic_guard = FailOpen(
            logger, backoff=Backoff(1.0, 30.0),
            lost="semantic cache lookup failed (%(error)s); answering without it, retrying in "
                 "%(pause_s).0f s",
            back="semantic cache lookups work again")
        self._scope = scope
        self._default_ttl_s = default_ttl_s
        self._max_entry_bytes = max_entry_bytes
        self._prefix = prefix
        self._writes: set[asyncio.Task[None]] = set()
        self.stats = stats or CacheStats()

    def lookup(self, headers: Mapping[str, str], body: GenerateRequest, spec: CacheTarget,
               key_id: str) -> Lookup:
        ttl = self._default_ttl_s if spec.cache_ttl_s is None else spec.cache_ttl_s
        control = headers.get("cache-control", "").lower()
        opted_in = headers.get(HEADER, "").lower() == "on"
        if ttl <= 0:
            return Lookup(None, False, 0, "caching is off for this model")
        if "no-store" in control:
            return Lookup(None, False, 0, "Cache-Control: no-store")
        if not (opted_in or body.temperature == 0 or getattr(body, "seed", None) is not None):
            return Lookup(None, False, 0, "not deterministic (no temperature 0, seed or x-iir-cache: on)")
        namespace = "global" if self._scope == "global" else key_id
        payload = body.model_dump(mode="json", exclude={"model", "user"}, exclude_none=True)
        document = {"ns": namespace, "model": spec.id, "kind": type(body).__name__, "body": payload}
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        key = self._prefix + hashlib.sha256(canonical.encode()).hexdigest()
        similar = semantic_query(headers, body, spec, namespace) if self._semantic is not None else None
        return Lookup(key, "no-cache" not in control, ttl, "cacheable", similar)

    async def get(self, lookup: Lookup) -> Found:
        """The exact lookup: a hit with its entry, a bypass, or a miss that ``get_similar`` then takes
        (and counts) in ``stats``."""
        if lookup.key is None or not lookup.read or not self.store.available:
            self.stats.bypasses += 1
            return Found("bypass")
        entry = await self._read(lookup.key)
        if entry is not None:
            self.stats.hits += 1
            return Found("hit", entry, "exact")
        if not self.store.available:
            # A Redis failure during this very lookup is a bypass: nothing was looked at.
            self.stats.bypasses += 1
            return Found("bypass")
        return Found("miss")

    async def get_similar(self, lookup: Lookup) -> Found:
        """After an exact miss: a paraphrase's answer, for requests that opted in (the SemanticCache)."""
        found = await self._get_similar(lookup)
        if found.entry is not None:
            self.stats.hits += 1
            self.stats.semantic_hits += 1
        else:
            self.stats.misses += 1
        return found

    async def _get_similar(self, lookup: Lookup) -> Found:
        if lookup.semantic is None or self._semantic is None:
            return Found("miss")
        if self._semantic_guard.paused():
            return Found("miss")  # it failed a moment ago
        try:
            async with asyncio.timeout(self._semantic_timeout_s):
                probe = await self._semantic.lookup(lookup.semantic.scope, lookup.semantic.text)
        except Exception as exc:  # fail open, like Redis: a slow or broken index only costs the hit
            self.stats.semantic_errors += 1
            metrics.CACHE_ERRORS.inc(backend="semantic")
            self._semantic_guard.failed(exc)
            return Found("miss")
        self._semantic_guard.succeeded()
        if probe.key is not None:
            entry = await self._read(probe.key)
            if entry is not None:
                return Found("hit", entry, "semantic", probe.similarity)
        return Found("miss", probe=probe)

    async def _read(self, key: str) -> dict[str, Any] | None:
        """The entry under ``key``: this process's copy, else the store's (then copied here)."""
        if self._hot is not None and (entry := self._hot.get(key)) is not None:
            return entry
        raw = await self.store.get(key)
        entry = _decode(raw) if raw is not None else None
        if entry is not None and self._hot is not None:
            self._hot.put(key, entry, len(raw or b""))
        return entry

    def put_later(self, lookup: Lookup, entry: dict[str, Any], probe: Probe | None = None) -> None:
        """Store off the response path; an entry larger than ``IIR_CACHE_MAX_ENTRY_BYTES`` is skipped.

        With the semantic lookup's ``probe``, the stored entry is then added to the semantic index.
        """
        if lookup.key is None:
            return
        # Wall-clock expiry, in the entry: every replica's copy ends when the store's does.
        entry["expires_at"] = round(time.time() + lookup.ttl_s, 3)
        raw = json.dumps(entry, separators=(",", ":")).encode()
        if len(raw) > self._max_entry_bytes:
            return
        if self._hot is not None and self.store.available:
            self._hot.put(lookup.key, entry, len(raw))
        task = asyncio.create_task(self._store(lookup, raw, probe))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _store(self, lookup: Lookup, raw: bytes, probe: Probe | None) -> None:
        assert lookup.key is not None
        await self.store.set(lookup.key, raw, lookup.ttl_s)
        self.stats.stored += 1
        if probe is not None and lookup.semantic is not None and self._semantic is not None:
            try:
                await self._semantic.add(lookup.semantic.scope, probe, lookup.key, lookup.ttl_s)
            except Exception as exc:
                self.stats.semantic_errors += 1
                metrics.CACHE_ERRORS.inc(backend="semantic")
                logger.warning("semantic cache: adding an entry failed (%s)", describe(exc))

    async def recording(self, lookup: Lookup, chunks: AsyncIterator[dict[str, Any]], probe: Probe | None
                        ) -> AsyncIterator[dict[str, Any]]:
        """Pass a stream through; store its chunks only if it ran to its end."""
        seen: list[dict[str, Any]] = []
        async for chunk in chunks:
            seen.append(dict(chunk))
            yield chunk
        self.put_later(lookup, {"kind": "stream", "chunks": seen}, probe)

    async def flush(self) -> None:
        """Wait for pending writes (tests and shutdown)."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    async def aclose(self) -> None:
        await self.flush()
        await self.store.aclose()


def _decode(raw: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and entry.get("kind") in ("json", "stream") else None


class RedisResponseStore:
    name = "redis"

    def __init__(self, redis: Redis, *, timeout_s: float, stats: CacheStats | None = None,
                 what: str = "response cache") -> None:
        self._redis = redis
        self._timeout_s = timeout_s
        self.stats = stats or CacheStats()
        self._guard = FailOpen(
            logger, probe=redis.ping, probe_timeout_s=timeout_s, backoff=Backoff(0.5, 5.0, jitter=True),
            lost=f"{what} off: Redis unavailable (%(error)s); requests are served without it until it is "
                 "back",
            back=f"Redis is back after %(seconds).1f s; the {what} is on again")

    async def get(self, key: str) -> bytes | None:
        if self._guard.paused():
            return None
        try:
            async with asyncio.timeout(self._timeout_s):
                value = await self._redis.get(key)
                return value.encode() if isinstance(value, str) else value
        except Exception as exc:  # fail open: a cache must never fail a request
            self.stats.errors += 1
            metrics.CACHE_ERRORS.inc(backend="redis")
            self._guard.failed(exc)
            return None

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        if self._guard.paused():
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.set(key, value, ex=ttl_s)
        except Exception as exc:
            self.stats.errors += 1
            metrics.CACHE_ERRORS.inc(backend="redis")
            self._guard.failed(exc)

    async def delete(self, key: str) -> bool:
        if self._guard.paused():
            return False
        try:
            async with asyncio.timeout(self._timeout_s):
                return bool(await self._redis.delete(key))
        except Exception as exc:
            self.stats.errors += 1
            metrics.CACHE_ERRORS.inc(backend="redis")
            self._guard.failed(exc)
            return False

    @property
    def available(self) -> bool:
        return self._guard.available

    def status(self) -> str:
        return "ok" if self._guard.available else "degraded: Redis away, serving without the cache"

    async def aclose(self) -> None:
        await self._guard.aclose()
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()


class MemoryResponseStore:
    """The embedded default without Redis: an LRU per ingress replica, bounded in entries."""

    name = "memory"
    available = True

    def __init__(self, max_entries: int = 10_000) -> None:
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._max = max_entries

    async def get(self, key: str) -> bytes | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, value = found
        if expires < time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: int) -> None:
        self._entries[key] = (time.monotonic() + ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def delete(self, key: str) -> bool:
        return self._entries.pop(key, None) is not None

    def status(self) -> str:
        return "memory (no Redis at start): per ingress replica"

    async def aclose(self) -> None:
        self._entries.clear()


async def make_store(redis_url: str | None, *, timeout_s: float, backend: str, stats: CacheStats,
                     what: str = "response cache", max_entries: int = 10_000) -> ResponseStore | None:
    """``auto``: Redis if it answers a PING now, else the in-process LRU (logged); ``off``: none.
    (Also the store of the Responses API's conversations: ``what`` names it in the log.)"""
    if backend == "off":
        return None
    if backend == "memory" or not redis_url:
        logger.warning("%s: in-process LRU (no Redis configured); each ingress replica keeps its own", what)
        return MemoryResponseStore(max_entries)
    redis = make_redis(redis_url, timeout_s=timeout_s)
    if backend == "auto":
        try:
            async with asyncio.timeout(max(timeout_s, 0.5)):
                await redis.ping()
        except Exception:
            await redis.aclose()
            logger.warning("%s: Redis at %s did not answer at start; using an in-process LRU per ingress "
                           "replica", what, redis_url.rsplit("@", 1)[-1])
            return MemoryResponseStore(max_entries)
    return RedisResponseStore(redis, timeout_s=timeout_s, stats=stats, what=what)
