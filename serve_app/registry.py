"""The model registry as the ingress sees it: the catalog from ``configs/`` and the engines serving it.

``refresh`` re-reads the config files and swaps the router's view at once: remote models appear or
vanish immediately. A new *local* model needs a ``ModelReplica`` deployment, which comes from
``serve deploy`` (``docs/ARCHITECTURE.md``); until then it is listed as unavailable with that reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from serve_app.catalog import Catalog, load_catalog
from serve_app.engines.base import InferenceEngine
from serve_app.engines.factory import RemoteEngines
from serve_app.router import ModelRouter
from serve_app.settings import Settings

logger = logging.getLogger(__name__)


class ConfigRegistry:
    def __init__(self, settings: Settings, router: ModelRouter,
                 local_engines: Mapping[str, InferenceEngine], remote: RemoteEngines) -> None:
        self._settings = settings
        self._router = router
        self._local = dict(local_engines)
        self._remote = remote
        self._retired: set[asyncio.Task[None]] = set()

    async def refresh(self) -> dict[str, Any]:
        old = self._router.catalog
        catalog = load_catalog(self._settings.models_config, self._settings.providers_config)
        remote = RemoteEngines(catalog, self._settings)
        engines = {**remote.engines, **{k: v for k, v in self._local.items() if catalog.get(k)}}
        self._router.replace(catalog, engines)
        previous, self._remote = self._remote, remote
        # Requests in flight still hold the old clients: close them once those can have finished.
        self._retired.add(asyncio.create_task(_close_later(previous, self._settings.upstream_timeout_s)))
        diff = _diff(old, catalog)
        diff["unavailable"] = [
            {"id": m.id, "reason": "local model has no ModelReplica deployment yet; run `serve deploy`"}
            for m in catalog.local_models if m.id not in self._local
        ]
        diff["models"] = [m.id for m in self._router.models()]
        logger.info("registry refreshed: %s", {k: v for k, v in diff.items() if k != "models"})
        return diff

    async def aclose(self) -> None:
        for task in self._retired:
            task.cancel()
        await self._remote.aclose()


async def _close_later(remote: RemoteEngines, delay_s: float) -> None:
    try:
        await asyncio.sleep(delay_s)
    finally:
        await remote.aclose()


def _diff(old: Catalog, new: Catalog) -> dict[str, Any]:
    before = {m.id: m for m in old.models}
    after = {m.id: m for m in new.models}
    return {
        "added": sorted(after.keys() - before.keys()),
        "removed": sorted(before.keys() - after.keys()),
        "changed": sorted(k for k in before.keys() & after.keys() if before[k] != after[k]),
    }
