"""The collaborators the ingress app is built from, in one place.

``create_app(gateway)`` needs exactly this; the Ray ``Ingress`` deployment fills it with Serve handles
and the in-process tests fill it with the plain objects.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from serve_app.auth.keystore import UNSET, KeyInfo, Unset
from serve_app.auth.service import KeyChange
from serve_app.cache.exact import CacheStats, ResponseCache, make_store
from serve_app.cache.semantic import SemanticLookup
from serve_app.ingress.admission import Admission
from serve_app.ingress.context import InFlight
from serve_app.ingress.key_cache import KeyVerifier, RevocationListener, VerifiedKeyCache
from serve_app.ingress.rate_limit import RateLimiter
from serve_app.ingress.stored_responses import StoredResponses
from serve_app.ingress.usage_recorder import UsageRecorder, UsageSink
from serve_app.redis_client import ChannelListener, make_redis
from serve_app.registry.catalog import Catalog, load_catalog
from serve_app.registry.follower import LocalEngineFactory, RegistryFollower, RegistrySource
from serve_app.registry.hardware import launchable_nodes
from serve_app.registry.in_process_models import InProcessReplicas
from serve_app.registry.model_registry import ModelRegistry, RegistrySnapshot
from serve_app.routing.classifier import RoutingPolicy
from serve_app.routing.health import CooldownShare
from serve_app.routing.router import ModelRouter, PromptClassifier
from serve_app.schemas import ApiKeyCreate
from serve_app.settings import Settings


class KeyAdmin(Protocol):
    """What the admin routes need: ``AuthService``, in process or as the Auth deployment (which is one)."""

    async def create(self, request: ApiKeyCreate) -> dict[str, Any]: ...
    async def list(self) -> list[KeyInfo]: ...
    async def get(self, key_id: str) -> KeyInfo: ...
    async def revoke(self, key_id: str) -> KeyChange: ...
    async def update(self, key_id: str, *, description: str | Unset = UNSET, priority: int | Unset = UNSET,
                     rate_limit_rpm: int | None | Unset = UNSET,
                     rate_limit_tpm: int | None | Unset = UNSET) -> KeyChange: ...
    async def usage(self, key_id: str) -> dict[str, Any]: ...
    async def ping(self) -> None: ...


@dataclass
class Gateway:
    settings: Settings
    keys: VerifiedKeyCache
    key_admin: KeyAdmin
    router: ModelRouter
    # Discovery again (the Registry), applied to this replica's router before it returns the diff.
    refresh_registry: Callable[[], Awaitable[dict[str, Any]]]
    # The registry as this replica last received it: models with status, nodes.
    registry_snapshot: Callable[[], RegistrySnapshot]
    revocations: RevocationListener
    limiter: RateLimiter
    usage: UsageRecorder
    # Priority queues in front of full local models.
    admission: Admission
    # Made at startup (it may PING Redis); None while starting, or with IIR_CACHE_BACKEND=off.
    cache: ResponseCache | None = None
    # The Responses API's stored responses, made at startup; None while starting, or with
    # IIR_RESPONSES_BACKEND=off.
    responses: StoredResponses | None = None
    in_flight: InFlight = field(default_factory=InFlight)
    # A proxy that hides client addresses (HAProxy) is the TCP peer of every request: trust only the
    # address it states with the proxy token (serve_app/ingress/trusted_ip.py).
    behind_proxy: bool = False
    # Started with the app (revocation listener, usage flusher), stopped at shutdown (pooled HTTP
    # clients; the last usage batch is sent before the limiter's Redis pool closes).
    on_startup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    on_shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


def build_gateway(settings: Settings, *, verifier: KeyVerifier, key_admin: KeyAdmin,
                  classifier: PromptClassifier, registry: RegistrySource,
                  local_engine: LocalEngineFactory, policy: RoutingPolicy | None = None,
                  semantic: SemanticLookup | None = None, behind_proxy: bool = False) -> Gateway:
    """Wire the ingress's collaborators; shared by the Ray ``Ingress`` and in-process tests.

    The router starts empty and fills from the registry's first snapshot at startup.
    """
    policy = policy or RoutingPolicy.load(settings.routing_config)
    empty = Catalog.model_construct(models=[], providers=[], default_model=policy.default)
    router = ModelRouter(empty, {}, policy=policy, classifier=classifier,
                         retry_after_s=settings.model_loading_retry_after_s,
                         classifier_timeout_s=settings.classifier_timeout_s)
    follower = RegistryFollower(registry, router, settings, local_engine)
    keys = VerifiedKeyCache(verifier, ttl_s=settings.key_cache_ttl_s, max_size=settings.key_cache_size,
                            negative_ttl_s=settings.negative_key_cache_ttl_s,
                            negative_max_size=settings.negative_key_cache_size,
                            stale_if_error_s=settings.key_stale_if_error_s)
    revocations = RevocationListener(keys, settings.redis_url)
    cooldowns = CooldownShare(router.health, settings.redis_url, prefix=settings.cooldown_key_prefix)
    limiter, usage = _metering(settings, cast(UsageSink, key_admin))
    gateway = Gateway(settings=settings, keys=keys, key_admin=key_admin, router=router,
                      refresh_registry=follower.refresh, registry_snapshot=lambda: follower.snapshot,
                      revocations=revocations, limiter=limiter, usage=usage,
                      admission=Admission(settings.queue_timeout_s), behind_proxy=behind_proxy,
                      on_startup=[follower.start, _started(revocations), _started(cooldowns), usage.start],
                      on_shutdown=[revocations.stop, cooldowns.aclose, follower.stop, usage.stop,
                                   limiter.aclose])

    async def start_cache() -> None:
        stats = CacheStats()
        store = await make_store(settings.redis_url, timeout_s=settings.cache_timeout_s,
                                 backend=settings.cache_backend, stats=stats)
        if store is not None:
            gateway.cache = ResponseCache(store, scope=settings.cache_scope,
                                          default_ttl_s=settings.cache_ttl_s,
                                          max_entry_bytes=settings.cache_max_entry_bytes, stats=stats,
                                          semantic=semantic,
                                          semantic_timeout_s=settings.semantic_cache_timeout_s,
                                          local_max_bytes=settings.cache_local_max_bytes,
                                          local_ttl_s=settings.cache_local_ttl_s)

    async def stop_cache() -> None:
        if gateway.cache is not None:
            await gateway.cache.aclose()

    async def start_stored_responses() -> None:
        store = await make_store(settings.redis_url, timeout_s=settings.responses_timeout_s,
                                 backend=settings.responses_backend, stats=CacheStats(),
                                 what="stored responses", max_entries=1_000)
        if store is not None:
            gateway.responses = StoredResponses(store, ttl_s=settings.responses_ttl_s,
                                                max_bytes=settings.responses_max_bytes)

    async def stop_stored_responses() -> None:
        if gateway.responses is not None:
            await gateway.responses.aclose()

    gateway.on_startup += [start_cache, start_stored_responses]
    gateway.on_shutdown += [stop_cache, stop_stored_responses]
    return gateway


def build_in_process_gateway(settings: Settings, *, verifier: KeyVerifier, key_admin: KeyAdmin,
                             classifier: PromptClassifier, semantic: SemanticLookup | None = None) -> Gateway:
    """The whole gateway without Ray: the registry lives here and local models load in this process."""
    replicas = InProcessReplicas()
    registry = ModelRegistry(lambda: load_catalog(settings.models_config, settings.providers_config),
                             replicas, models_dir=settings.models_dir, poll_s=settings.registry_poll_s,
                             idle_poll_s=settings.registry_idle_poll_s,
                             cpu_hour_usd=settings.cpu_hour_usd,
                             launchable=launchable_nodes(settings.launchable_nodes))
    gateway = build_gateway(settings, verifier=verifier, key_admin=key_admin, classifier=classifier,
                            registry=registry, local_engine=lambda entry: replicas.engine(entry.id),
                            semantic=semantic)
    gateway.on_startup.insert(0, registry.start)
    gateway.on_shutdown.extend([registry.stop, replicas.aclose])
    return gateway


def _metering(settings: Settings, usage_sink: UsageSink) -> tuple[RateLimiter, UsageRecorder]:
    # The key admin (the Auth deployment's handle on Ray) also takes the usage batches, typed by
    # usage.UsageSink so the admin protocol does not grow for the ingress's sake.
    limiter = RateLimiter(make_redis(settings.redis_url, timeout_s=settings.redis_timeout_s),
                          timeout_s=settings.redis_timeout_s, key_prefix=settings.rate_limit_key_prefix)
    usage = UsageRecorder(usage_sink, interval_s=settings.usage_flush_interval_s,
                          flush_at_keys=settings.usage_flush_keys, max_keys=settings.usage_max_keys)
    return limiter, usage


def _started(listener: ChannelListener) -> Callable[[], Awaitable[None]]:
    async def start() -> None:
        listener.start()

    return start
