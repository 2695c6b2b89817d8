"""``SemanticCache``: the index of answered prompts for the semantic cache; called only on an exact-cache
miss of a request that opted in (``serve_app/semantic_cache.py``).

One replica: the index is its memory, and a second replica would hold a second, disjoint index.
"""

from __future__ import annotations

from ray import serve

from serve_app.embedder import OnnxEmbedder
from serve_app.semantic_cache import Probe, SemanticIndex
from serve_app.settings import Settings


@serve.deployment
class SemanticCache:
    def __init__(self, settings: Settings) -> None:
        self._index = SemanticIndex(OnnxEmbedder(cache_dir=settings.cache_dir),
                                    threshold=settings.semantic_cache_threshold,
                                    max_entries=settings.semantic_cache_max_entries)

    async def lookup(self, scope: str, text: str) -> Probe:
        return await self._index.lookup(scope, text)

    async def add(self, scope: str, probe: Probe, key: str, ttl_s: int) -> None:
        await self._index.add(scope, probe, key, ttl_s)
