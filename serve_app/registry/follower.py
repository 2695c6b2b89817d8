"""The ingress's side of the registry: follow its snapshot and keep the router's engines in step.

A long poll (``wait_for_change``) brings each new snapshot as soon as the Registry publishes it, so
every ingress replica sees a refresh within one round trip and no request waits on the registry.
Engines are rebuilt only for what changed: remote clients when the remote models or providers change
(the old clients are closed once requests in flight can have finished), local handles per model.

Snapshots are ordered by version within one epoch (one start of the Registry). A restarted Registry
starts a new epoch at version 1: its snapshot is taken whatever version this replica had, and the long
poll then waits on the new epoch's versions instead of being answered at once forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from serve_app.engines.base import InferenceEngine
from serve_app.engines.factory import RemoteEngines
from serve_app.failopen import Backoff, FailOpen
from serve_app.registry.model_registry import RegistryEntry, RegistrySnapshot
from serve_app.routing.router import ModelRouter
from serve_app.settings import Settings

logger = logging.getLogger(__name__)

LocalEngineFactory = Callable[[RegistryEntry], InferenceEngine | None]


class RegistrySource(Protocol):
    """The Registry deployment's handle, or the in-process ``ModelRegistry``."""

    async def wait_for_change(self, epoch: str, version: int, timeout_s: float = ...) -> RegistrySnapshot: ...
    async def refresh(self) -> dict[str, Any]: ...


class RegistryFollower:
    def __init__(self, registry: RegistrySource, router: ModelRouter, settings: Settings,
                 local_engine: LocalEngineFactory, *, long_poll_s: float = 30.0) -> None:
        self._registry = registry
        self._router = router
        self._settings = settings
        self._local_engine = local_engine
        self._long_poll_s = long_poll_s
        self.snapshot = RegistrySnapshot()
        self._remote: RemoteEngines | None = None
        self._remote_key: str | None = None
        self._local: dict[str, tuple[str, InferenceEngine]] = {}
        self._task: asyncio.Task[None] | None = None
        self._retired: set[asyncio.Task[None]] = set()
        # A steady 1 s between polls that fail; the traceback, since a failure here may be a bug in
        # applying a snapshot rather than an unreachable registry.
        self._registry_guard = FailOpen(
            logger, backoff=Backoff(1.0, 1.0), log_traceback=True,
            lost="following the registry failed (%(error)s); retrying every %(pause_s).0f s",
            back="following the registry again after %(seconds).0f s")

    async def start(self) -> None:
        try:
            self.apply(await self._registry.wait_for_change(self.snapshot.epoch, self.snapshot.version, 0))
        except Exception:
            logger.warning("registry not reachable yet; following it in the background", exc_info=True)
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        for task in self._retired:
            task.cancel()
        if self._remote:
            await self._remote.aclose()

    async def refresh(self) -> dict[str, Any]:
        diff = await self._registry.refresh()
        # This replica answers with the new list in hand; the others get it through their long polls.
        self.apply(await self._registry.wait_for_change(self.snapshot.epoch, self.snapshot.version, 0))
        return diff

    def apply(self, snapshot: RegistrySnapshot) -> None:
        if not self.is_newer(snapshot):
            return
        catalog = snapshot.catalog()
        self._update_remote(snapshot)
        engines: dict[str, InferenceEngine] = dict(self._remote.engines if self._remote else {})
        local: dict[str, tuple[str, InferenceEngine]] = {}
        for entry in snapshot.entries:
            if not entry.spec.is_local or entry.status == "unavailable":
                continue
            key = entry.spec.model_dump_json()
            cached = self._local.get(entry.id)
            engine = cached[1] if cached and cached[0] == key else self._local_engine(entry)
            if engine is not None:
                local[entry.id] = (key, engine)
                engines[entry.id] = engine
        self._local = local
        self._router.replace(catalog, engines, {e.id: e for e in snapshot.entries})
        self.snapshot = snapshot

    def is_newer(self, snapshot: RegistrySnapshot) -> bool:
        """Published (version 0 is a registry that has none yet), and from another epoch or later."""
        if snapshot.version == 0:
            return False
        return snapshot.epoch != self.snapshot.epoch or snapshot.version > self.snapshot.version

    def _update_remote(self, snapshot: RegistrySnapshot) -> None:
        remote_models = [e.spec for e in snapshot.entries if not e.spec.is_local]
        key = repr(([m.model_dump() for m in remote_models], [p.model_dump() for p in snapshot.providers]))
        if key == self._remote_key:
            return
        previous = self._remote
        self._remote = RemoteEngines(snapshot.catalog(), self._settings)
        self._remote_key = key
        if previous is not None:
            # Requests in flight still hold the old clients: close them once those can have finished.
            task = asyncio.create_task(_close_later(previous, self._settings.upstream_timeout_s))
            self._retired.add(task)  # held until done: the loop keeps only weak references to tasks
            task.add_done_callback(self._retired.discard)

    async def _follow(self) -> None:
        while True:
            try:
                self.apply(await self._registry.wait_for_change(self.snapshot.epoch, self.snapshot.version,
                                                                self._long_poll_s))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await asyncio.sleep(self._registry_guard.failed(exc))
                continue
            self._registry_guard.succeeded()


async def _close_later(remote: RemoteEngines, delay_s: float) -> None:
    try:
        await asyncio.sleep(delay_s)
    finally:
        await remote.aclose()
