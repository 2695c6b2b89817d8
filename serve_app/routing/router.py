"""Where a request goes: ``model`` (a model, a group, or ``auto``) → a ``Plan`` of the models that may
serve it (serve_app/routing/plan.py), each attempt a ``Route``: a catalog entry and its engine.

Local models are reached through a ``ModelReplica`` handle (one Serve hop); remote models through a
``RemoteEngine`` living in the ingress process (no hop). Both look like ``InferenceEngine`` here.
Each model's health (in flight, latency, circuit breaker) is in ``self.health`` (health.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from serve_app import metrics
from serve_app.engines.base import InferenceEngine
from serve_app.engines.factory import engine_concurrency
from serve_app.errors import IIRError, ModelNotFound, ServiceUnavailable
from serve_app.failopen import Backoff, FailOpen
from serve_app.fair_queue import GateLimits
from serve_app.registry.catalog import Catalog, ModelGroup, ModelSpec
from serve_app.routing.classifier import Candidate, Classification, Conversation, RoutingPolicy
from serve_app.routing.health import HealthBoard
from serve_app.routing.plan import Plan, Stage, order_members

if TYPE_CHECKING:
    from serve_app.registry.model_registry import RegistryEntry

AUTO_MODELS = frozenset({"auto", "iir/auto"})
logger = logging.getLogger(__name__)


class PromptClassifier(Protocol):
    async def classify(self, conversation: Conversation) -> Classification: ...


@dataclass(frozen=True)
class Decision:
    """What ``auto`` chose, and why (``POST /v1/classify`` shows it)."""

    classification: Classification | None  # None: the classifier was down, the default route was taken
    model: str
    reason: str


@dataclass(frozen=True)
class Route:
    spec: ModelSpec
    engine: InferenceEngine
    decision: Decision | None = None  # model: "auto" only
    # The admission gate in front of it (serve_app/ingress/admission.py): local models, and remote
    # ones with max_concurrency; None: not gated.
    gate: str | None = None
    limits: GateLimits | None = None


@dataclass(frozen=True)
class CacheIdentity:
    """What the response cache keys a target on: a group's answers are the group's, whichever member
    gave them; it caches only as long as its shortest-lived member allows."""

    id: str
    cache_ttl_s: int | None
    semantic_cache: bool


class ModelRouter:
    def __init__(self, catalog: Catalog, engines: Mapping[str, InferenceEngine], *,
                 policy: RoutingPolicy, classifier: PromptClassifier, retry_after_s: int = 5,
                 classifier_timeout_s: float = 1.0) -> None:
        self._classifier = classifier
        self._classifier_timeout_s = classifier_timeout_s
        self._classifier_guard = FailOpen(
            logger, backoff=Backoff(1.0, 30.0),
            lost="classifier failed (%(error)s); auto takes the default route for %(pause_s).0f s",
            back="classifier answers again after %(seconds).0f s; auto routes by category")
        self._policy = policy
        self._retry_after = str(retry_after_s)
        self._waking: dict[str, asyncio.Task[None]] = {}
        self.health = HealthBoard(catalog.resilience.cooldown)
        self.replace(catalog, engines)

    def replace(self, catalog: Catalog, engines: Mapping[str, InferenceEngine],
                entries: Mapping[str, RegistryEntry] | None = None) -> None:
        """Swap in a new catalog at once; requests in flight keep the engine they resolved.

        ``entries`` (from the registry) carry each model's status; without them every model that has
        an engine counts as available.
        """
        self.catalog = catalog
        self._engines = dict(engines)
        self._entries = dict(entries or {})
        self._specs = {m.id: m for m in catalog.models}
        self._groups = {g.id: g for g in catalog.groups}
        self._providers = {p.name: p for p in catalog.providers}
        self._gates = {m.id: gate for m in catalog.models if (gate := self._gate(m)) is not None}
        self.health.configure(catalog.resilience.cooldown)

    def models(self) -> list[ModelSpec]:
        """What ``/v1/models`` lists: models that are served or about to be (not the unavailable)."""
        return [m for m in self.catalog.models
                if m.id in self._engines and self._status(m.id) != "unavailable"]

    def groups(self) -> list[ModelGroup]:
        """What ``/v1/models`` lists besides the models: each group once."""
        return list(self._groups.values())

    def group(self, group_id: str) -> ModelGroup | None:
        return self._groups.get(group_id)

    def entry(self, model_id: str) -> RegistryEntry | None:
        return self._entries.get(model_id)

    def _status(self, model_id: str) -> str:
        entry = self._entries.get(model_id)
        return entry.status if entry else "available"

    def _routable(self) -> set[str]:
        return {m for m in self._engines if self._status(m) == "available"}

    def engine_for(self, model_id: str) -> InferenceEngine | None:
        return self._engines.get(model_id)

    async def plan(self, model: str, conversation: Conversation) -> Plan:
        """The request's plan: its target's members first (``auto``: the model it chose), fallbacks as
        failures call for them. An unknown id is a 404 here, before anything is tried."""
        decision = None
        if model in AUTO_MODELS:
            decision = await self.decide(conversation)
            model = decision.model
        first = self._stage(model)
        if first is None:
            raise ModelNotFound(f"The model '{model}' does not exist or you do not have access to it.",
                                param="model")
        if not first.rules.fallbacks and decision is None:
            self._servable(first)
        more = (lambda tried: self._next_for_auto(decision, tried)) if decision is not None else None
        return Plan(target=model, first=first, resilience=self.catalog.resilience, health=self.health,
                    stage_for=self._stage, route_for=lambda spec: self.route(spec, decision),
                    more_for_auto=more, decision=decision)

    def _servable(self, stage: Stage) -> None:
        """A target none of whose members can serve now (unavailable, not deployed, loading) and that
        has no fallback is answered at once with the reason, before the cache: a model the registry
        lists as unavailable says so, rather than answering from what it said before."""
        error: IIRError | None = None
        for spec in stage.members:
            try:
                self.route(spec)
                return
            except IIRError as exc:
                error = exc
        if error is not None:
            raise error

    def cache_identity(self, target: str) -> ModelSpec | CacheIdentity | None:
        spec = self._specs.get(target)
        if spec is not None:
            return spec
        group = self._groups.get(target)
        if group is None:
            return None
        members = [self._specs[m.model] for m in group.members if m.model in self._specs]
        ttls = [m.cache_ttl_s for m in members if m.cache_ttl_s is not None]
        return CacheIdentity(group.id, min(ttls) if ttls else None,
                             bool(members) and all(m.semantic_cache for m in members))

    def _stage(self, target: str) -> Stage | None:
        spec = self._specs.get(target)
        if spec is not None:
            return Stage(target, [spec], spec)
        group = self._groups.get(target)
        if group is None:
            return None
        return Stage(target, order_members(group, self._specs, self.health, self._cost), group)

    def _cost(self, spec: ModelSpec) -> float:
        entry = self._entries.get(spec.id)
        cost = entry.cost_per_1k_tokens if entry else spec.cost_per_1k_tokens
        return cost if cost is not None else float("inf")

    def route(self, spec: ModelSpec, decision: Decision | None = None) -> Route:
        """One attempt's route to ``spec``, or the 503 that says why it cannot serve now (the plan then
        moves to another member, or answers with it)."""
        engine = self._engines.get(spec.id)
        entry = self._entries.get(spec.id)
        if entry is not None and entry.status == "unavailable":
            raise ServiceUnavailable(f"model '{spec.id}' is unavailable: {entry.reason}", param="model",
                                     code="model_unavailable")
        if engine is None:
            raise ServiceUnavailable(f"model '{spec.id}' is configured but not deployed", param="model",
                                     code="model_unavailable")
        if entry is not None and (entry.status == "loading" or entry.cold):
            if entry.cold:
                self._wake(spec.id, engine)
            raise ServiceUnavailable(
                f"model '{spec.id}' is starting a replica; retry in {self._retry_after} s", param="model",
                code="model_loading", headers={"Retry-After": self._retry_after})
        gate, limits = self._gates.get(spec.id, (None, None))
        return Route(spec, engine, decision, gate, limits)

    def _gate(self, spec: ModelSpec) -> tuple[str, GateLimits] | None:
        """A local model's room is its engines' real concurrency × running replicas, plus burst up to
        ``max_ongoing_requests`` for requests that outrank one in flight (admission.py). A remote one's
        is its own ``max_concurrency``, else its provider's (one gate for all the provider's models)."""
        if spec.is_local:
            entry = self._entries.get(spec.id)
            if entry is None:
                return None  # not run by the registry (in-process engines in tests and benches)
            replicas = max(entry.replicas or 1, 1)
            running = min(engine_concurrency(spec), spec.max_ongoing_requests)
            return spec.id, GateLimits(running * replicas, (spec.max_ongoing_requests - running) * replicas)
        if spec.max_concurrency is not None:
            return spec.id, GateLimits(spec.max_concurrency)
        provider = self._providers.get(str(spec.provider))
        if provider is not None and provider.max_concurrency is not None:
            return f"provider:{provider.name}", GateLimits(provider.max_concurrency)
        return None

    def _next_for_auto(self, decision: Decision, tried: set[str]) -> str | None:
        """``auto``'s chosen model failed: the category's next candidate (never one already tried)."""
        candidates = [c for c in self._candidates() if c.id not in tried]
        if not candidates:
            return None
        if decision.classification is None:
            model, _ = self._policy.fallback(candidates, "retry")
        else:
            model, _ = self._policy.choose(decision.classification, candidates)
        return model if model not in tried else None

    def _wake(self, model_id: str, engine: InferenceEngine) -> None:
        """A scaled-to-zero model: one queued call makes Serve start a replica; callers retry later."""
        if model_id in self._waking and not self._waking[model_id].done():
            return
        self._waking[model_id] = asyncio.create_task(self._call_health(model_id, engine))

    @staticmethod
    async def _call_health(model_id: str, engine: InferenceEngine) -> None:
        try:
            await engine.check_health()
        except Exception as exc:  # reported by the registry's watch; here only logged
            logger.warning("waking %s failed: %s", model_id, exc)

    async def decide(self, conversation: Conversation) -> Decision:
        """Classify, then pick among the available chat models by the routing policy.

        A classifier that fails or is slower than its timeout costs that one request the timeout; the
        next ones skip it for a while (1 s, doubling to 30 s) and take the policy's default route,
        so a broken or stuck classifier never holds up ``auto`` (docs/ARCHITECTURE.md, failure policies).
        """
        started = time.perf_counter()
        result = await self._classify(conversation)
        candidates = self._candidates()
        if result is None:
            model, reason = self._policy.fallback(candidates, "classifier unavailable")
            metrics.CLASSIFIER_DECISIONS.inc(category="unclassified", model=model)
            return Decision(None, model, reason)
        metrics.CLASSIFIER_LATENCY.observe(time.perf_counter() - started)
        model, reason = self._policy.choose(result, candidates)
        metrics.CLASSIFIER_DECISIONS.inc(category=result.category, model=model)
        return Decision(result, model, reason)

    async def _classify(self, conversation: Conversation) -> Classification | None:
        if self._classifier_guard.paused():
            return None
        try:
            async with asyncio.timeout(self._classifier_timeout_s):
                result = await self._classifier.classify(conversation)
        except Exception as exc:  # noqa: BLE001 - whatever broke, "auto" takes the default route
            self._classifier_guard.failed(exc)  # warns once per outage, not per request
            return None
        self._classifier_guard.succeeded()
        return result

    def _candidates(self) -> list[Candidate]:
        """Chat models ``auto`` may choose: available, awake, and not cooling down after failures."""
        candidates = []
        for model_id in sorted(self._routable()):
            spec = self.catalog.get(model_id)
            entry = self._entries.get(model_id)
            if spec is not None and spec.task == "chat" and not (entry and entry.cold) \
                    and not self.health[model_id].breaker.cooling_down():
                cost = entry.cost_per_1k_tokens if entry else spec.cost_per_1k_tokens
                candidates.append(Candidate(model_id, spec.quality_tier, cost, frozenset(spec.tags)))
        return candidates
