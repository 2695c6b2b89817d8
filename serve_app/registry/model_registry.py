"""The model registry: declared models (``models.yaml``) plus discovery, fit-checked against the cluster,
deployed, watched, persisted, and handed to every ingress replica as one versioned snapshot.

    refresh():  declared catalog ─┐
                models directory ─┼─▶ specs ─▶ fit check (nodes) ─▶ replicas.apply(local specs that fit)
                providers' /models┘                                 store.save(snapshot), notify
                                                                    then drain the models that left
    watch loop: replicas.states() every ``poll_s`` ─▶ loading → available, failures → unavailable

Ingresses follow the snapshot with ``wait_for_change`` (a long poll), so no request reads the DB and a
refresh reaches every ingress replica within one round trip. A snapshot is named by ``(epoch,
version)``: the epoch is new with each start of the registry, whose versions restart then, so a
follower takes any snapshot of a new epoch and orders versions only within one. The DB copy is for
restarts and for operators (``GET /v1/registry``); losing the DB loses nothing the next refresh cannot
rebuild.

One bad input spoils only itself: a broken ``models.yaml`` fails the refresh with ``InvalidConfig`` and
leaves the current snapshot in force; a model that cannot be assessed or deployed is listed
``unavailable`` with the reason while the others go ahead; a provider whose ``/models`` fails keeps the
models it listed last time (marked stale) until it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from serve_app import metrics
from serve_app.errors import InvalidConfig
from serve_app.registry.catalog import (
    Catalog,
    CatalogError,
    ModelGroup,
    ModelSpec,
    ProviderSpec,
    Resilience,
    Scheduling,
    resolve_source,
)
from serve_app.registry.cost import CPU_HOUR_USD, cost_per_1k_tokens
from serve_app.registry.discovery import Discovered, Origin, discover
from serve_app.registry.fit import ModelSourceError, check_fit, estimate_for
from serve_app.registry.hardware import NodeInfo

logger = logging.getLogger(__name__)

Status = Literal["available", "loading", "unavailable"]


class ReplicaState(BaseModel):
    """What the replica manager sees of one local model's deployment."""

    status: Status
    running: int = 0
    message: str = ""


class ReplicaManager(Protocol):
    """Runs local models: Serve applications on Ray (``model_applications``), engines in-process in tests."""

    async def nodes(self) -> list[NodeInfo]: ...
    async def apply(self, wanted: Mapping[str, ModelSpec]) -> dict[str, ReplicaState]:
        """Run exactly ``wanted``; the states right after (new deployments are loading)."""
        ...
    async def states(self) -> dict[str, ReplicaState]: ...
    async def drain_removed(self) -> None:
        """Stop the models that left ``wanted``. Called once the snapshot without them is published, so
        ingresses stop routing to a model before its application goes."""
        ...


class RegistryEntry(BaseModel):
    spec: ModelSpec
    origin: Origin
    status: Status
    reason: str | None = None
    cost_per_1k_tokens: float | None = None
    gpu_memory_gb: float | None = Field(None, description="estimated need of one replica (local models)")
    replicas: int | None = Field(None, description="running replicas (local models)")
    node_ids: list[str] = Field(default_factory=list, description="nodes that can host a replica")

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def cold(self) -> bool:
        """Scaled to zero: the next request starts a replica and is told to come back."""
        return self.spec.is_local and self.status == "available" and self.replicas == 0


class RegistrySnapshot(BaseModel):
    epoch: str = Field("", description="new with each start of the registry; versions restart with it")
    version: int = 0
    entries: list[RegistryEntry] = Field(default_factory=list)
    providers: list[ProviderSpec] = Field(default_factory=list)
    default_model: str = ""
    groups: list[ModelGroup] = Field(default_factory=list)
    resilience: Resilience = Field(default_factory=Resilience)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    nodes: list[dict[str, Any]] = Field(default_factory=list)
    refreshed_at: float = 0.0

    def catalog(self) -> Catalog:
        """Every entry, unavailable ones too: asking for one is a 503 with its reason, not a 404."""
        return Catalog.model_construct(models=[e.spec for e in self.entries], providers=self.providers,
                                       default_model=self.default_model, groups=self.groups,
                                       resilience=self.resilience, scheduling=self.scheduling)

    def entry(self, model_id: str) -> RegistryEntry | None:
        return next((e for e in self.entries if e.id == model_id), None)


class RegistryStore(Protocol):
    def load(self) -> list[RegistryEntry]: ...
    def save(self, entries: list[RegistryEntry]) -> None: ...


CatalogSource = Callable[[], Catalog]


class ModelRegistry:
    def __init__(self, source: CatalogSource, replicas: ReplicaManager, *,
                 store: RegistryStore | None = None, models_dir: Path | None = None,
                 poll_s: float = 1.0, idle_poll_s: float = 10.0, discovery_timeout_s: float = 5.0,
                 cpu_hour_usd: float = CPU_HOUR_USD, launchable: list[NodeInfo] | None = None) -> None:
        self._cpu_hour_usd = cpu_hour_usd
        self._launchable = list(launchable or [])
        self._source = source
        self._replicas = replicas
        self._store = store
        self._models_dir = models_dir
        self._poll_s = poll_s
        self._idle_poll_s = max(poll_s, idle_poll_s)
        self._discovery_timeout_s = discovery_timeout_s
        self.epoch = uuid.uuid4().hex
        self._snapshot = RegistrySnapshot(epoch=self.epoch)
        self._changed = asyncio.Condition()
        self._refresh_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Serve the persisted list at once, then discover; a failed first refresh is retried by the
        watch loop rather than keeping the registry (and every ingress) down."""
        try:
            await self.serve_persisted()
            await self.refresh()
        except Exception:
            logger.exception("first registry refresh failed; serving the persisted list, retrying")
        self._watcher = asyncio.create_task(self._watch())

    async def serve_persisted(self) -> bool:
        """Publish the DB copy, if there is one, before discovery runs: a restarted registry serves the
        last list at once, discovered models included, even while a provider or the models dir is away."""
        persisted = await self._load_persisted()
        if not persisted:
            return False
        await self._publish(persisted, self._declared(), nodes=[])
        return True

    async def stop(self) -> None:
        if self._watcher:
            self._watcher.cancel()

    # -- reads ---------------------------------------------------------------------------------------
    def snapshot(self) -> RegistrySnapshot:
        return self._snapshot

    async def wait_for_change(self, epoch: str, version: int, timeout_s: float = 30.0) -> RegistrySnapshot:
        """The snapshot as soon as it is not the caller's ``(epoch, version)``, or the current one at
        timeout. Never early with nothing published yet: an empty list must not replace a follower's."""

        def changed() -> bool:
            now = self._snapshot
            return now.version > 0 and (now.epoch != epoch or now.version != version)

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(changed), timeout_s)
            except TimeoutError:
                pass
        return self._snapshot

    # -- refresh ---------------------------------------------------------------------------------------
    async def refresh(self) -> dict[str, Any]:
        """Discover, fit-check, apply; the diff against the previous snapshot."""
        async with self._refresh_lock:
            timer = _StepTimer()
            before = self._snapshot
            declared = self._declared()
            nodes = await self._replicas.nodes() + self._launchable
            timer.step("nodes")
            found = await discover(declared.models, declared.providers, models_dir=self._models_dir,
                                   timeout_s=self._discovery_timeout_s)
            timer.step("discovery")
            stale = {e.id: e for e in _stale_listings(before, found)}
            providers = {p.name: p for p in declared.providers}
            entries = [await self._assess_one(spec, origin, nodes, providers, found.conflicts)
                       for spec, origin in [*found.specs, *((e.spec, e.origin) for e in stale.values())]]
            entries = [_mark_stale(e, found.errors) if e.id in stale else e for e in entries]
            timer.step("fit")
            states = await self._replicas.apply({e.id: e.spec for e in entries
                                                 if e.spec.is_local and e.status != "unavailable"})
            entries = _merge_states(entries, states)
            timer.step("apply")
            after = await self._publish(entries, declared, nodes)
            await self._replicas.drain_removed()  # only now that the snapshot without them is out
            timer.step("publish")
            diff = registry_diff(before, after)
            diff["errors"] = _errors(found, list(stale.values()))
            diff["took_ms"] = timer.steps
            logger.info("registry refreshed: %s", {k: v for k, v in diff.items() if k != "models"})
            return diff

    def _declared(self) -> Catalog:
        try:
            return self._source()
        except CatalogError as exc:  # the operator's edit is refused; what is served stays as it is
            raise InvalidConfig(f"the model catalog is invalid, nothing was changed: {exc}") from exc

    async def _assess_one(self, spec: ModelSpec, origin: Origin, nodes: list[NodeInfo],
                          providers: Mapping[str, ProviderSpec],
                          conflicts: Mapping[str, str]) -> RegistryEntry:
        """One model's entry; whatever goes wrong with it makes it unavailable, not the refresh fail."""
        if spec.id in conflicts:
            return RegistryEntry(spec=spec, origin=origin, status="unavailable", reason=conflicts[spec.id])
        try:
            return await self._assess(spec, origin, nodes, providers)
        except ModelSourceError as exc:
            return RegistryEntry(spec=spec, origin=origin, status="unavailable", reason=str(exc))
        except Exception as exc:
            logger.warning("registry: could not assess %s", spec.id, exc_info=True)
            return RegistryEntry(spec=spec, origin=origin, status="unavailable",
                                 reason=f"could not be assessed: {type(exc).__name__}: {exc}")

    async def _assess(self, spec: ModelSpec, origin: Origin, nodes: list[NodeInfo],
                      providers: Mapping[str, ProviderSpec]) -> RegistryEntry:
        cost = cost_per_1k_tokens(spec, cpu_hour_usd=self._cpu_hour_usd)
        if not spec.is_local:
            provider = providers.get(str(spec.provider))
            if provider and provider.api_key_env and not os.environ.get(provider.api_key_env):
                # Listed but not routable: "auto" must not pick a model that can only answer 502.
                return RegistryEntry(spec=spec, origin=origin, status="unavailable", cost_per_1k_tokens=cost,
                                     reason=f"environment variable {provider.api_key_env} is not set")
            return RegistryEntry(spec=spec, origin=origin, status="available", cost_per_1k_tokens=cost)
        try:
            await asyncio.to_thread(resolve_source, str(spec.source))
        except (FileNotFoundError, OSError) as exc:
            return RegistryEntry(spec=spec, origin=origin, status="unavailable", cost_per_1k_tokens=cost,
                                 reason=str(exc))
        estimate = await asyncio.to_thread(estimate_for, spec)
        fit = check_fit(spec, nodes, estimate_gb=estimate)
        return RegistryEntry(spec=spec, origin=origin, status="loading" if fit.fits else "unavailable",
                             reason=None if fit.fits else fit.reason, cost_per_1k_tokens=cost,
                             gpu_memory_gb=estimate if spec.resources.num_gpus else None,
                             node_ids=fit.node_ids)

    # -- watch -------------------------------------------------------------------------------------------
    async def _watch(self) -> None:
        """Follow replica states; a status change is a new snapshot version for the ingresses."""
        while True:
            await asyncio.sleep(self._poll_s if self._settling() else self._idle_poll_s)
            self._report_status()
            try:
                if not self._snapshot.refreshed_at:
                    await self.refresh()
                    continue
                read_at = self._snapshot.version
                states = await self._replicas.states()
                async with self._refresh_lock:
                    current = self._snapshot
                    if current.version != read_at:
                        # A refresh published while the states were read: they may describe models it
                        # removed or made unavailable; the next tick reads again.
                        continue
                    merged = _merge_states(current.entries, states)
                    if merged != current.entries:
                        await self._publish(merged, None, None)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("registry watch failed; retrying", exc_info=True)

    def _report_status(self) -> None:
        # Also on every watch tick, so a metric lost while Ray's agent was starting comes back.
        entries = self._snapshot.entries
        for status in ("available", "loading", "unavailable"):
            metrics.REGISTRY_MODELS.set(sum(e.status == status for e in entries), status=status)

    def _settling(self) -> bool:
        """Poll fast while a model loads or sits at zero replicas (a request may be waking it)."""
        return any(e.spec.is_local and (e.status == "loading" or e.replicas == 0)
                   for e in self._snapshot.entries)

    # -- publish -----------------------------------------------------------------------------------------
    async def _publish(self, entries: list[RegistryEntry], declared: Catalog | None,
                       nodes: list[NodeInfo] | None) -> RegistrySnapshot:
        old = self._snapshot
        snapshot = RegistrySnapshot(
            epoch=self.epoch, version=old.version + 1, entries=sorted(entries, key=lambda e: e.id),
            providers=declared.providers if declared else old.providers,
            default_model=declared.default_model if declared else old.default_model,
            groups=declared.groups if declared else old.groups,
            resilience=declared.resilience if declared else old.resilience,
            scheduling=declared.scheduling if declared else old.scheduling,
            nodes=[n.to_dict() for n in nodes] if nodes is not None else old.nodes,
            refreshed_at=time.time() if nodes else old.refreshed_at,
        )
        async with self._changed:
            self._snapshot = snapshot
            self._changed.notify_all()
        self._report_status()
        await self._persist(snapshot.entries)
        return snapshot

    async def _persist(self, entries: list[RegistryEntry]) -> None:
        if self._store is None:
            return
        try:
            await asyncio.to_thread(self._store.save, entries)
        except Exception as exc:  # the DB copy is a convenience; the snapshot lives here
            logger.warning("registry: could not persist the model list: %s", exc)

    async def _load_persisted(self) -> list[RegistryEntry]:
        if self._store is None:
            return []
        try:
            entries = await asyncio.to_thread(self._store.load)
        except Exception as exc:
            logger.warning("registry: could not load the persisted model list: %s", exc)
            return []
        # Replicas are unknown until the watch loop looks: local models start as loading.
        return [e.model_copy(update={"status": "loading", "replicas": None})
                if e.spec.is_local and e.status == "available" else e for e in entries]


class _StepTimer:
    """Milliseconds per refresh step, reported in the diff: where a slow refresh spends its time."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}
        self._last = time.perf_counter()

    def step(self, name: str) -> None:
        now = time.perf_counter()
        self.steps[name] = round((now - self._last) * 1000, 1)
        self._last = now


def _stale_listings(before: RegistrySnapshot, found: Discovered) -> list[RegistryEntry]:
    """What a provider whose ``/models`` failed this time listed last time: a blip must not take its
    models from every ingress. A later good answer is what removes them."""
    listed = {spec.id for spec, _ in found.specs}
    return [e for e in before.entries if e.origin == "provider" and e.spec.provider in found.failed_providers
            and e.id not in listed]


def _mark_stale(entry: RegistryEntry, errors: Mapping[str, str]) -> RegistryEntry:
    if entry.reason is not None:
        return entry
    why = errors.get(f"provider {entry.spec.provider}", "it failed")
    return entry.model_copy(update={
        "reason": f"stale: kept from {entry.spec.provider}'s last good /models listing ({why})"})


def _errors(found: Discovered, stale: list[RegistryEntry]) -> dict[str, str]:
    errors = dict(found.errors)
    for name in sorted({str(e.spec.provider) for e in stale}):
        kept = sorted(e.id for e in stale if e.spec.provider == name)
        errors[f"provider {name}"] += f"; kept stale until it answers again: {', '.join(kept)}"
    return errors


def _merge_states(entries: list[RegistryEntry], states: Mapping[str, ReplicaState]) -> list[RegistryEntry]:
    """Local entries take their deployment's state; managers report only models they were told to run."""
    merged = []
    for entry in entries:
        state = states.get(entry.id)
        if state is None:
            merged.append(entry)
            continue
        merged.append(entry.model_copy(update={
            "status": state.status, "replicas": state.running,
            "reason": (state.message or "the deployment failed") if state.status == "unavailable"
            else state.message or None,
        }))
    return merged


def registry_diff(before: RegistrySnapshot, after: RegistrySnapshot) -> dict[str, Any]:
    old = {e.id: e for e in before.entries}
    new = {e.id: e for e in after.entries}
    return {
        "added": sorted(new.keys() - old.keys()),
        "removed": sorted(old.keys() - new.keys()),
        "changed": sorted(k for k in old.keys() & new.keys() if old[k].spec != new[k].spec),
        "unavailable": [{"id": e.id, "reason": e.reason} for e in after.entries if e.status == "unavailable"],
        "models": [e.id for e in after.entries if e.status != "unavailable"],
        "version": after.version,
    }
