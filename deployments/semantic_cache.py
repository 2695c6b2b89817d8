"""``SemanticCache``: the index of answered prompts for the semantic cache; called only on an exact-cache
miss of a request that opted in (``serve_app/cache/semantic.py``).

One replica: the index is its memory, and a second replica would hold a second, disjoint index. Each
entry is also journaled in Redis with its TTL, so a restarted replica rebuilds the index in the
background (lookups meanwhile see what has been rebuilt so far).
"""

from __future__ import annotations

import asyncio
import logging

from ray import serve

from serve_app.cache.semantic import Probe, SemanticIndex, SemanticJournal
from serve_app.redis_client import make_redis
from serve_app.routing.embedder import OnnxEmbedder
from serve_app.settings import Settings

logger = logging.getLogger(__name__)


@serve.deployment
class SemanticCache:
    def __init__(self, settings: Settings) -> None:
        self._index = SemanticIndex(OnnxEmbedder(cache_dir=settings.cache_dir),
                                    threshold=settings.semantic_cache_threshold,
                                    max_entries=settings.semantic_cache_max_entries)
        self._journal = (SemanticJournal(make_redis(settings.redis_url, timeout_s=1.0))
                         if settings.redis_url and settings.cache_backend in ("auto", "redis") else None)
        self._rebuild: asyncio.Task[None] | None = None

    async def lookup(self, scope: str, text: str) -> Probe:
        self._start_rebuild()
        return await self._index.lookup(scope, text)

    async def add(self, scope: str, probe: Probe, key: str, ttl_s: int) -> None:
        self._start_rebuild()
        await self._index.add(scope, probe, key, ttl_s)
        if self._journal is not None:
            await self._journal.record(scope, probe, key, ttl_s)

    async def check_health(self) -> None:
        self._start_rebuild()  # Serve calls this soon after start: the rebuild begins without traffic

    def _start_rebuild(self) -> None:
        if self._rebuild is None and self._journal is not None:
            self._rebuild = asyncio.create_task(self._replay(self._journal))

    async def _replay(self, journal: SemanticJournal) -> None:
        added = await journal.replay(self._index)
        if added:
            logger.info("semantic cache: %d entries rebuilt from Redis", added)
