"""The request pipeline: the ordered steps every model endpoint runs.

    authenticate → limit → prepare → route → cache → [admit → call]… → meter → store → present → log
    (deps.py)       ──────────────────────────── Pipeline.run ───────────────────────────   (middleware.py)

``prepare`` and ``present`` are the job's own: nothing for most, and for ``/v1/responses`` the
translation to chat and back (serve_app/ingress/responses_api.py). ``route`` makes the request's plan (a
model, a group's members, fallbacks; serve_app/routing/plan.py); admit and call run once per attempt
until one answers (retries, fallbacks, cooldowns: docs/ARCHITECTURE.md, "Resilient routing").

Routes only parse, build a ``Job`` (jobs.py) and render the ``Answer``; every step reads and writes the
``RequestContext`` it is handed. Each step is one method here, so a new one (a fallback, a retry, a
priority class) has an obvious place. The steps that must not delay the answer are in-memory only:
metering adds to counters that a background task sends, and the cache stores after the response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from serve_app import metrics
from serve_app.auth.keystore import KeyInfo
from serve_app.cache import exact as response_cache
from serve_app.errors import IIRError, PermissionDenied, UpstreamError
from serve_app.fair_queue import GateLimits
from serve_app.ingress import sse
from serve_app.ingress.context import UNCLASSIFIED, RequestContext
from serve_app.ingress.gateway import Gateway
from serve_app.ingress.jobs import Answer, Job
from serve_app.ingress.metering import Meter
from serve_app.routing.plan import Failure, Plan, classify
from serve_app.routing.router import AUTO_MODELS, Decision, Route

T = TypeVar("T")


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
        await job.prepare(self._gateway, ctx)
        plan = await self._route(ctx, job)
        if plan is None:  # /v1/classify: the decision is the answer
            assert ctx.decision is not None
            return Answer(job.answer(ctx.decision))
        return await job.present(ctx, await self._answer(ctx, job, plan))

    async def _answer(self, ctx: RequestContext, job: Job, plan: Plan) -> Answer:
        if (hit := await self._cache(ctx, job, plan)) is not None:
            return hit
        assert ctx.key is not None
        ctx.turn = self._gateway.router.catalog.scheduling.turn(ctx.key.priority, ctx.key.id)
        await self._admit_group(ctx, plan)
        if job.streaming:
            return await self._call_stream(ctx, job, plan)
        route, result = await self._attempts(ctx, plan, lambda route: job.call(route, ctx.turn))
        ctx.release_model()
        self._meter(ctx, route.spec.id).record(result.get("usage"))
        self._store(ctx, plan, {"kind": "json", "body": result})
        return Answer(result)

    # 2. limit: before anything costly (classifier, model)
    async def _limit(self, ctx: RequestContext) -> None:
        assert ctx.key is not None
        ctx.headers.update(await self._gateway.limiter.check(ctx.key))

    # 3. route: the plan for the named model or group, or for what auto chose; classify stops at the
    #    decision
    async def _route(self, ctx: RequestContext, job: Job) -> Plan | None:
        router = self._gateway.router
        if job.model is None:
            ctx.decision = await router.decide(job.conversation())
            return None
        conversation = job.conversation() if job.model in AUTO_MODELS else []
        plan = await router.plan(job.model, conversation)
        ctx.target = plan.target
        ctx.headers["x-iir-model"] = plan.target
        if plan.decision is not None:
            ctx.decision = plan.decision
            ctx.headers["x-iir-category"] = _category(plan.decision)
            if (result := plan.decision.classification) is not None:
                ctx.headers["x-iir-confidence"] = f"{result.confidence:.3f}"
        return plan

    # 4. cache: exact, then (opted in) semantic; a hit answers without admission or a model
    async def _cache(self, ctx: RequestContext, job: Job, plan: Plan) -> Answer | None:
        cache = self._gateway.cache
        body = job.cacheable()
        identity = self._gateway.router.cache_identity(plan.target)
        if body is None or identity is None:
            return None
        if cache is None:
            found = response_cache.Found("bypass")
        else:
            assert ctx.key is not None
            ctx.cache_lookup = cache.lookup(job.headers, body, identity, ctx.key.id)
            found = await cache.get(ctx.cache_lookup)  # exact
            if found.outcome == "miss":
                found = await cache.get_similar(ctx.cache_lookup)  # then by meaning, where opted in
        ctx.cache = found
        ctx.headers[response_cache.HEADER] = found.outcome
        if found.match is not None:
            ctx.headers[response_cache.MATCH_HEADER] = found.match
        if found.similarity is not None:
            ctx.headers[response_cache.SIMILARITY_HEADER] = f"{found.similarity:.3f}"
        metrics.CACHE_LOOKUPS.inc(model=plan.target, result=found.outcome, match=found.match or "")
        if found.entry is None:
            return None
        self._meter(ctx, plan.target).record(None)  # a hit: one request, no tokens; the body keeps its usage
        entry = found.entry
        if entry["kind"] == "json":
            return Answer(entry["body"])
        chunks = iter(entry["chunks"])

        async def replay() -> AsyncIterator[dict[str, Any]]:
            for chunk in chunks:
                yield dict(chunk)  # the entry is shared with other hits; the stream sets "model"

        first = next(chunks, None)
        return Answer(None, dict(first) if first is not None else None, replay())

    # 5. admit: wait in line, by key priority and fair share, for room on a full model, or be refused
    #    at once past the class's budget (admission.py)
    async def _admit(self, ctx: RequestContext, route: Route) -> None:
        if route.gate is None or route.limits is None:
            return
        ctx.hold(await self._gateway.admission.enter(route.gate, route.limits, ctx.turn))

    async def _admit_group(self, ctx: RequestContext, plan: Plan) -> None:
        """A group with ``max_concurrency``: one ticket for the whole request, whichever members it
        tries (given back when the response has left)."""
        group = self._gateway.router.group(plan.target)
        if group is None or group.max_concurrency is None:
            return
        ctx.hold_group(await self._gateway.admission.enter(
            f"group:{group.id}", GateLimits(group.max_concurrency), ctx.turn))

    # 6. call: each attempt of the plan in turn (serve_app/routing/plan.py), until one answers; for a
    #    stream, until one gives its first chunk (never after: a cut stream ends with an error event)
    async def _attempts(self, ctx: RequestContext, plan: Plan, call: Callable[[Route], Awaitable[T]]
                        ) -> tuple[Route, T]:
        failure: Failure | None = None
        error: IIRError | None = None
        while (attempt := plan.next(failure, error)) is not None:
            if error is not None and ctx.route is not None:
                metrics.UPSTREAM_RETRIES.inc(model=ctx.route.spec.id, reason=error.code or "",
                                             how="fallback" if attempt.fallback else "retry")
            if attempt.wait_s:
                await asyncio.sleep(attempt.wait_s)
            route = ctx.route = attempt.route
            ctx.attempts = plan.attempts
            health = attempt.health
            await self._admit(ctx, route)
            ctx.occupy(health)
            started = time.perf_counter()
            answered = False
            try:
                async with asyncio.timeout(attempt.timeout_s):
                    result = await call(route)
                answered = True
            except Exception as exc:
                failure = classify(exc)
                if failure.kind == "final":
                    raise
                error = _as_error(exc, route.spec.id, attempt.timeout_s)
                if failure.kind == "retry":
                    health.failed(failure.severity, error.code or type(error).__name__,
                                  failure.retry_after_s)
                continue
            finally:
                if not answered:
                    ctx.release_model()
            health.answered(time.perf_counter() - started)
            ctx.fallback = attempt.fallback
            ctx.headers["x-iir-model"] = route.spec.id
            ctx.headers["x-iir-attempts"] = str(plan.attempts)
            if attempt.fallback:
                ctx.headers["x-iir-fallback"] = plan.target
            return route, result
        raise plan.exhausted()

    async def _call_stream(self, ctx: RequestContext, job: Job, plan: Plan) -> Answer:
        async def first_chunk(route: Route) -> tuple[dict[str, Any] | None, AsyncIterator[dict[str, Any]]]:
            chunks = job.stream(route, ctx.turn)
            try:
                return await anext(chunks), chunks
            except StopAsyncIteration:
                return None, chunks
            except BaseException:
                await sse.close(chunks)
                raise

        route, (first, rest) = await self._attempts(ctx, plan, first_chunk)
        # 7-8. meter and store, as the stream passes
        # The model slot and its in-flight count are given back when the stream ends (and, failing
        # that, when the request ends).
        chunks = self._meter(ctx, route.spec.id).stream(sse.chained(first, rest, on_end=ctx.release_model),
                                                       strip_usage=not job.client_wants_usage)
        cache = self._gateway.cache
        if cache is not None and ctx.cache_lookup is not None and not ctx.fallback:
            chunks = cache.recording(ctx.cache_lookup, chunks, ctx.cache.probe if ctx.cache else None)
        first, rest = await sse.first_and_rest(chunks)
        return Answer(None, first, rest)

    # 7. meter: in-memory adds (usage batches and token limits are sent in the background), charged to
    #    the model that ran
    def _meter(self, ctx: RequestContext, model_id: str) -> Meter:
        if ctx.meter is None:
            assert ctx.key is not None
            gateway = self._gateway
            # Only a key with a tokens/minute limit needs its tokens counted in Redis.
            limiter = gateway.limiter if ctx.key.rate_limit_tpm is not None else None
            ctx.meter = Meter(gateway.usage, limiter, ctx.key.id, model_id)
        return ctx.meter

    # 8. store: after the response, never in its way; a fallback's answer is not the target's to keep
    def _store(self, ctx: RequestContext, plan: Plan, entry: dict[str, Any]) -> None:
        cache = self._gateway.cache
        if cache is not None and ctx.cache_lookup is not None and not ctx.fallback:
            cache.put_later(ctx.cache_lookup, entry, ctx.cache.probe if ctx.cache else None)


def _as_error(exc: Exception, model_id: str, timeout_s: float) -> IIRError:
    if isinstance(exc, IIRError):
        return exc
    return UpstreamError(f"model '{model_id}' gave no answer within {timeout_s:.3g} s",
                         code="upstream_timeout")


def _category(decision: Decision) -> str:
    result = decision.classification
    return result.category if result is not None else UNCLASSIFIED
