"""The request pipeline: the ordered steps every model endpoint runs.

    authenticate → limit → route → cache → admit → call → meter → store → log
    (deps.py)       ─────────────────── Pipeline.run ───────────────────   (middleware.py)

Routes only parse, build a ``Job`` (jobs.py) and render the ``Answer``; every step reads and writes the
``RequestContext`` it is handed. Each step is one method here, so a new one (a fallback, a retry, a
priority class) has an obvious place. The steps that must not delay the answer are in-memory only:
metering adds to counters that a background task sends, and the cache stores after the response.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from serve_app import metrics
from serve_app.auth.keystore import KeyInfo
from serve_app.cache import exact as response_cache
from serve_app.errors import PermissionDenied
from serve_app.ingress import sse
from serve_app.ingress.context import RequestContext
from serve_app.ingress.gateway import Gateway
from serve_app.ingress.jobs import Job
from serve_app.ingress.metering import Meter
from serve_app.routing.router import AUTO_MODELS, Route


@dataclass(slots=True)
class Answer:
    """A JSON body, or a stream whose first chunk already arrived (so a failure before it is a status)."""

    body: dict[str, Any] | None = None
    first: dict[str, Any] | None = None
    rest: AsyncIterator[dict[str, Any]] | None = None

    @property
    def streaming(self) -> bool:
        return self.rest is not None


class Pipeline:
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    # 1. authenticate: every route but key creation and the probes (deps.py calls these)
    async def authenticate(self, ctx: RequestContext, authorization: str | None) -> KeyInfo:
        ctx.key = await self._gateway.keys.authenticate(authorization)
        return ctx.key

    def require_inference(self, ctx: RequestContext) -> None:
        """Model routes: the key must carry the ``inference`` scope (an admin-only key manages, never
        spends); from here the request counts as in flight."""
        assert ctx.key is not None
        if "inference" not in ctx.key.scopes:
            raise PermissionDenied("this key lacks the 'inference' scope needed to call models",
                                   reason="scope")
        ctx.count_in_flight(self._gateway.in_flight, ctx.key.priority)

    async def run(self, ctx: RequestContext, job: Job) -> Answer:
        await self._limit(ctx)
        route = await self._route(ctx, job)
        if route is None:  # /v1/classify: the decision is the answer
            assert ctx.decision is not None
            return Answer(job.answer(ctx.decision))
        if (hit := await self._cache(ctx, job, route)) is not None:
            return hit
        await self._admit(ctx, route)
        if job.streaming:
            return await self._call_stream(ctx, job, route)
        try:
            result = await job.call(route)
        finally:
            ctx.release_admission()
        self._meter(ctx, route).record(result.get("usage"))
        self._store(ctx, {"kind": "json", "body": result})
        return Answer(result)

    # 2. limit: before anything costly (classifier, model); it also costs the Classifier's CPU
    async def _limit(self, ctx: RequestContext) -> None:
        assert ctx.key is not None
        ctx.headers.update(await self._gateway.limiter.check(ctx.key))

    # 3. route: the named model, or what auto chose; classify stops at the decision
    async def _route(self, ctx: RequestContext, job: Job) -> Route | None:
        router = self._gateway.router
        if job.model is None:
            ctx.decision = await router.decide(job.conversation())
            return None
        conversation = job.conversation() if job.model in AUTO_MODELS else []
        route = ctx.route = await router.resolve(job.model, conversation)
        ctx.headers["x-iir-model"] = route.spec.id
        if route.decision is not None:
            ctx.headers["x-iir-category"] = ctx.category or ""
            if (result := route.decision.classification) is not None:
                ctx.headers["x-iir-confidence"] = f"{result.confidence:.3f}"
        return route

    # 4. cache: exact, then (opted in) semantic; a hit answers without admission or a model
    async def _cache(self, ctx: RequestContext, job: Job, route: Route) -> Answer | None:
        cache = self._gateway.cache
        body = job.cacheable(route)
        if body is None:
            return None
        if cache is None:
            found = response_cache.Found("bypass")
        else:
            assert ctx.key is not None
            ctx.cache_lookup = cache.lookup(job.headers, body, route.spec, ctx.key.id)
            found = await cache.get(ctx.cache_lookup)  # exact
            if found.outcome == "miss":
                found = await cache.get_similar(ctx.cache_lookup)  # then by meaning, where opted in
        ctx.cache = found
        ctx.headers[response_cache.HEADER] = found.outcome
        if found.match is not None:
            ctx.headers[response_cache.MATCH_HEADER] = found.match
        if found.similarity is not None:
            ctx.headers[response_cache.SIMILARITY_HEADER] = f"{found.similarity:.3f}"
        metrics.CACHE_LOOKUPS.inc(model=route.spec.id, result=found.outcome, match=found.match or "")
        if found.entry is None:
            return None
        self._meter(ctx, route).record(None)  # a hit: one request, no tokens; the body keeps its usage
        entry = found.entry
        if entry["kind"] == "json":
            return Answer(entry["body"])
        chunks = iter(entry["chunks"])

        async def replay() -> AsyncIterator[dict[str, Any]]:
            for chunk in chunks:
                yield chunk

        return Answer(None, next(chunks, None), replay())

    # 5. admit: wait, by key priority, for room on a full local model (admission.py)
    async def _admit(self, ctx: RequestContext, route: Route) -> None:
        if route.capacity is None:
            return
        assert ctx.key is not None
        ctx.hold(await self._gateway.admission.enter(route.spec.id, route.capacity, ctx.key.priority))

    # 6-8. call, meter and store, for a stream: the meter and the cache read it as it passes
    async def _call_stream(self, ctx: RequestContext, job: Job, route: Route) -> Answer:
        chunks = self._meter(ctx, route).stream(_releasing(job.stream(route), ctx),
                                                 strip_usage=not job.client_wants_usage)
        cache = self._gateway.cache
        if cache is not None and ctx.cache_lookup is not None:
            chunks = cache.recording(ctx.cache_lookup, chunks, ctx.cache.probe if ctx.cache else None)
        first, rest = await sse.first_and_rest(chunks)
        return Answer(None, first, rest)

    # 7. meter: in-memory adds (usage batches and token limits are sent in the background)
    def _meter(self, ctx: RequestContext, route: Route) -> Meter:
        if ctx.meter is None:
            assert ctx.key is not None
            gateway = self._gateway
            # Only a key with a tokens/minute limit needs its tokens counted in Redis.
            limiter = gateway.limiter if ctx.key.rate_limit_tpm is not None else None
            ctx.meter = Meter(gateway.usage, limiter, ctx.key.id, route.spec.id)
        return ctx.meter

    # 8. store: after the response, never in its way
    def _store(self, ctx: RequestContext, entry: dict[str, Any]) -> None:
        cache = self._gateway.cache
        if cache is not None and ctx.cache_lookup is not None:
            cache.put_later(ctx.cache_lookup, entry, ctx.cache.probe if ctx.cache else None)


async def _releasing(chunks: AsyncIterator[dict[str, Any]],
                     ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
    """The model slot is given back when the stream ends (and, failing that, when the request ends)."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        ctx.release_admission()
