"""``Registry``: discovery, fit check and the model applications; the ingresses follow its snapshot."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ray import serve
from ray.serve import Application

from serve_app.registry.catalog import CatalogSourceArgs, ModelSpec
from serve_app.registry.hardware import launchable_nodes
from serve_app.registry.model_applications import ServeReplicas
from serve_app.registry.model_registry import ModelRegistry, RegistrySnapshot
from serve_app.registry.store import SqlRegistryStore
from serve_app.settings import Settings

logger = logging.getLogger(__name__)


@serve.deployment
class Registry:
    def __init__(self, settings: Settings, declared: CatalogSourceArgs,
                 build_model_app: Callable[[ModelSpec], Application]) -> None:
        # build_model_app comes from the builder (the one place that binds deployments), so this
        # module never imports the builder that imports it.
        store = SqlRegistryStore(settings.database_url_plain())
        try:
            store.upgrade()
        except Exception:  # the snapshot lives in memory; the DB copy catches up when the DB is back
            logger.warning("registry: database not reachable at start", exc_info=True)
        replicas = ServeReplicas(build_model_app)
        self._registry = ModelRegistry(declared.loader(settings), replicas, store=store,
                                       models_dir=settings.models_dir, poll_s=settings.registry_poll_s,
                                       idle_poll_s=settings.registry_idle_poll_s,
                                       cpu_hour_usd=settings.cpu_hour_usd,
                                       launchable=launchable_nodes(settings.launchable_nodes))
        replicas.adopt({e.id: e.spec for e in _safe_load(store)
                        if e.spec.is_local and e.status != "unavailable"})
        self._started: asyncio.Task[None] | None = None

    async def _ready(self) -> None:
        # Started by the first call (the ingresses' first long poll): Serve constructors are synchronous.
        if self._started is None:
            self._started = asyncio.create_task(self._registry.start())
        await asyncio.shield(self._started)

    async def wait_for_change(self, epoch: str, version: int, timeout_s: float = 30.0) -> RegistrySnapshot:
        await self._ready()
        return await self._registry.wait_for_change(epoch, version, timeout_s)

    async def refresh(self) -> dict[str, Any]:
        await self._ready()
        return await self._registry.refresh()


def _safe_load(store: SqlRegistryStore) -> list[Any]:
    try:
        return store.load()
    except Exception:  # the DB copy is a convenience; without it models are redeployed once
        return []
