"""OpenAI-compatible routes and the generic ``/infer``.

Every model route checks the caller's rate limit after auth and body validation and before anything
costly (classifier, model), and records usage after the model answered (``api/metering.py``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from serve_app import metrics, response_cache
from serve_app.admission import Release
from serve_app.api import sse
from serve_app.api.deps import GatewayDep, InferenceKey
from serve_app.api.metering import Meter, with_stream_usage
from serve_app.api.middleware import annotate, when_done
from serve_app.catalog import ModelSpec
from serve_app.classifier import Conversation
from serve_app.errors import InvalidRequest, ModelNotFound, ServiceUnavailable
from serve_app.gateway import Gateway
from serve_app.infer import run_infer
from serve_app.keystore import KeyInfo
from serve_app.response_cache import Found
from serve_app.router import AUTO_MODELS, Route
from serve_app.schemas import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    InferRequest,
)

router = APIRouter()
UNCLASSIFIED = "unclassified"  # x-iir-category while the classifier is down and auto took the default


def _route_headers(request: Request, route: Route) -> dict[str, str]:
    """Also notes the route for the request's log line."""
    annotate(request.scope, model=route.spec.id)
    headers = {"x-iir-model": route.spec.id}
    if route.decision is not None:
        result = route.decision.classification
        category = result.category if result is not None else UNCLASSIFIED
        annotate(request.scope, category=category)
        headers["x-iir-category"] = category
        if result is not None:
            headers["x-iir-confidence"] = f"{result.confidence:.3f}"
    return headers


def _conversation(body: ChatCompletionRequest | CompletionRequest) -> Conversation:
    """What the classifier reads: the turns as (role, text); a completion prompt is one user turn."""
    if isinstance(body, CompletionRequest):
        return [("user", "\n".join(body.prompts()))]
    return [(m.role, m.text()) for m in body.messages]


async def _generate(request: Request, gateway: GatewayDep, key: KeyInfo,
                    body: ChatCompletionRequest | CompletionRequest) -> Any:
    limit_headers = await gateway.limiter.check(key)
    conversation = _conversation(body) if body.model in AUTO_MODELS else []
    route = await gateway.router.resolve(body.model, conversation)
    body = body.model_copy(update={"model": route.spec.id})
    headers = {**_route_headers(request, route), **limit_headers}
    meter = Meter(gateway, key, route.spec.id)
    cache = gateway.cache
    lookup = cache.lookup(request.headers, body, route.spec, key.id) if cache else None
    found = await cache.get(lookup) if cache is not None and lookup is not None else Found("bypass")
    headers.update(_cache_headers(found))
    annotate(request.scope, cache=found.outcome if found.match is None else f"{found.outcome}:{found.match}")
    metrics.CACHE_LOOKUPS.inc(model=route.spec.id, result=found.outcome, match=found.match or "")
    if found.entry is not None:
        meter.record(None)  # a hit: one request, no tokens (no model ran); the body keeps its usage
        return _from_cache(request, found.entry, route.spec.id, headers)
    release = await _admit(request, gateway, route, key)
    if not body.stream:
        try:
            result = await route.engine.generate(body)
        finally:
            release()
        meter.record(result.get("usage"))
        result["model"] = route.spec.id
        if cache is not None and lookup is not None:
            cache.put_later(lookup, {"kind": "json", "body": result}, found.probe)
        return _json(result, headers)
    chunks = meter.stream(_releasing(route.engine.stream(with_stream_usage(body)), release),
                          strip_usage=not body.include_usage)
    if cache is not None and lookup is not None:
        chunks = cache.recording(lookup, chunks, found.probe)
    first, rest = await sse.first_and_rest(chunks)
    return _sse(request, first, rest, route.spec.id, headers)


async def _admit(request: Request, gateway: Gateway, route: Route, key: KeyInfo) -> Release:
    """Wait, by key priority, for room on a full local model (serve_app/admission.py)."""
    if route.capacity is None:
        return _nothing
    release = await gateway.admission.enter(route.spec.id, route.capacity, key.priority)
    when_done(request.scope, release)  # a stream abandoned before its first chunk still gives it back
    return release


def _nothing() -> None:
    pass


async def _releasing(chunks: AsyncIterator[dict[str, Any]],
                     release: Release) -> AsyncIterator[dict[str, Any]]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        release()


def _cache_headers(found: Found) -> dict[str, str]:
    headers: dict[str, str] = {response_cache.HEADER: found.outcome}
    if found.match is not None:
        headers[response_cache.MATCH_HEADER] = found.match
    if found.similarity is not None:
        headers[response_cache.SIMILARITY_HEADER] = f"{found.similarity:.3f}"
    return headers


def _from_cache(request: Request, entry: dict[str, Any], model_id: str, headers: dict[str, str]) -> Response:
    if entry["kind"] == "json":
        return _json(entry["body"], headers)
    chunks = iter(entry["chunks"])

    async def replay() -> AsyncIterator[dict[str, Any]]:
        for chunk in chunks:
            yield chunk

    return _sse(request, next(chunks, None), replay(), model_id, headers)


def _sse(request: Request, first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]], model_id: str,
         headers: dict[str, str]) -> Response:
    request_id = request.scope.get("state", {}).get("request_id", "-")
    events = sse.event_stream(first, rest, model_id=model_id, request_id=request_id)
    headers["cache-control"] = "no-cache"
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


def _json(payload: dict[str, Any], headers: dict[str, str]) -> Response:
    return JSONResponse(payload, headers=headers)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, gateway: GatewayDep,
                           key: InferenceKey) -> Any:
    return await _generate(request, gateway, key, body)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, gateway: GatewayDep,
                      key: InferenceKey) -> Any:
    return await _generate(request, gateway, key, body)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request, gateway: GatewayDep,
                     key: InferenceKey) -> Response:
    if body.model in AUTO_MODELS:
        # Vectors from different models can't be compared: picking one per request would corrupt indexes.
        raise InvalidRequest('model "auto" routes chat and completions; embeddings need a named model '
                             "(GET /v1/models lists them by task)", param="model", code="model_not_supported")
    limit_headers = await gateway.limiter.check(key)
    route = await gateway.router.resolve(body.model, [])
    release = await _admit(request, gateway, route, key)
    try:
        result = await route.engine.embed(body.model_copy(update={"model": route.spec.id}))
    finally:
        release()
    Meter(gateway, key, route.spec.id).record(result.get("usage"))
    result["model"] = route.spec.id
    return _json(result, {**_route_headers(request, route), **limit_headers})


@router.get("/v1/models")
async def list_models(gateway: GatewayDep, _: InferenceKey) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(gateway, m) for m in gateway.router.models()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, gateway: GatewayDep, _: InferenceKey) -> dict[str, Any]:
    spec = next((m for m in gateway.router.models() if m.id == model_id), None)
    if spec is None:
        raise ModelNotFound(f"The model '{model_id}' does not exist or you do not have access to it.",
                            param="model")
    return _model_card(gateway, spec)


def _model_card(gateway: Gateway, spec: ModelSpec) -> dict[str, Any]:
    # OpenAI's fields, then ours: the SDKs keep fields they don't know.
    entry = gateway.router.entry(spec.id)
    return {"id": spec.id, "object": "model", "created": 0, "owned_by": spec.owner, "task": spec.task,
            "status": entry.status if entry else "available", "tags": spec.tags,
            "cost_per_1k_tokens": entry.cost_per_1k_tokens if entry else spec.cost_per_1k_tokens}


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, gateway: GatewayDep, key: InferenceKey) -> Response:
    """What ``model: "auto"`` would do with this conversation, without calling a model."""
    limit_headers = await gateway.limiter.check(key)  # it costs the Classifier's CPU like a model call
    conversation = [("user", body.input)] if body.input is not None else [
        (m.role, m.text()) for m in body.messages or []]
    decision = await gateway.router.decide(conversation)
    result = decision.classification
    if result is None:
        raise ServiceUnavailable(f"the classifier is unavailable; model \"auto\" takes {decision.model} "
                                 "meanwhile", code="classifier_unavailable", headers={"Retry-After": "5"})
    return _json({"category": result.category, "confidence": result.confidence,
                  "complexity": result.complexity, "model": decision.model, "reason": decision.reason,
                  "scores": result.scores}, dict(limit_headers))


@router.post("/infer")
async def infer(body: InferRequest, request: Request, gateway: GatewayDep, key: InferenceKey) -> Response:
    limit_headers = await gateway.limiter.check(key)
    prompt = body.input.get("prompt") or body.input.get("text") or ""
    route = await gateway.router.resolve(body.model, [("user", str(prompt))])
    release = await _admit(request, gateway, route, key)
    try:
        result = await run_infer(route, body.input)
    finally:
        release()
    # Generic tasks report no usage: a request, no tokens.
    Meter(gateway, key, route.spec.id).record(result.get("usage"))
    return _json(result, {**_route_headers(request, route), **limit_headers})
