"""OpenAI-compatible model routes, the generic ``/infer`` and ``/v1/classify``: parse, run the pipeline
(``serve_app/ingress/pipeline.py``), render."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query
from starlette.responses import Response

from serve_app.errors import ModelNotFound, NotFound
from serve_app.ingress.deps import Call, GatewayDep, InferenceKey, ModelCall
from serve_app.ingress.fast_path import ModelRoute
from serve_app.ingress.gateway import Gateway
from serve_app.ingress.jobs import ClassifyJob, EmbedJob, GenerateJob, InferJob, ResponsesJob
from serve_app.ingress.render import render
from serve_app.ingress.responses_api import input_item_page
from serve_app.ingress.stored_responses import StoredResponses
from serve_app.registry.catalog import ModelGroup, ModelSpec
from serve_app.schemas import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    InferRequest,
    ResponsesRequest,
)

router = APIRouter()

# Each model route: its schema and the pipeline job it makes. The FastAPI routes below and the fast path
# (serve_app/ingress/fast_path.py, which answers JSON bodies before FastAPI sees them) share this table.
MODEL_ROUTES: dict[str, ModelRoute] = {
    "/v1/chat/completions": ModelRoute(ChatCompletionRequest, GenerateJob),
    "/v1/completions": ModelRoute(CompletionRequest, GenerateJob),
    "/v1/embeddings": ModelRoute(EmbeddingRequest, lambda body, _: EmbedJob(body)),
    "/infer": ModelRoute(InferRequest, lambda body, _: InferJob(body)),
    "/v1/classify": ModelRoute(ClassifyRequest, lambda body, _: ClassifyJob(body)),
    "/v1/responses": ModelRoute(ResponsesRequest, ResponsesJob),
}


async def _run(path: str, body: Any, call: ModelCall) -> Response:
    job = MODEL_ROUTES[path].job(body, call.headers)
    return render(call.ctx, await call.pipeline.run(call.ctx, job))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, call: Call) -> Response:
    return await _run("/v1/chat/completions", body, call)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, call: Call) -> Response:
    return await _run("/v1/completions", body, call)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, call: Call) -> Response:
    return await _run("/v1/embeddings", body, call)


@router.post("/infer")
async def infer(body: InferRequest, call: Call) -> Response:
    return await _run("/infer", body, call)


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, call: Call) -> Response:
    return await _run("/v1/classify", body, call)


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, call: Call) -> Response:
    return await _run("/v1/responses", body, call)


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, gateway: GatewayDep, key: InferenceKey) -> dict[str, Any]:
    """A stored response, to the key that made it (serve_app/ingress/stored_responses.py)."""
    return await _stored(gateway).response(key.id, response_id)


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(response_id: str, gateway: GatewayDep, key: InferenceKey,
                           order: Literal["asc", "desc"] = "desc", limit: int = Query(20, ge=1, le=100),
                           after: str | None = None) -> dict[str, Any]:
    items = await _stored(gateway).input_items(key.id, response_id)
    return input_item_page(items, response_id, order=order, limit=limit, after=after)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, gateway: GatewayDep, key: InferenceKey) -> dict[str, Any]:
    await _stored(gateway).delete(key.id, response_id)
    return {"id": response_id, "object": "response", "deleted": True}


def _stored(gateway: Gateway) -> StoredResponses:
    if gateway.responses is None:
        raise NotFound("stored responses are off here (IIR_RESPONSES_BACKEND=off)", param="response_id")
    return gateway.responses


@router.get("/v1/models")
async def list_models(gateway: GatewayDep, _: InferenceKey) -> dict[str, Any]:
    models = [_model_card(gateway, m) for m in gateway.router.models()]
    groups = [card for g in gateway.router.groups() if (card := _group_card(gateway, g)) is not None]
    return {"object": "list", "data": models + groups}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, gateway: GatewayDep, _: InferenceKey) -> dict[str, Any]:
    spec = next((m for m in gateway.router.models() if m.id == model_id), None)
    if spec is not None:
        return _model_card(gateway, spec)
    group = gateway.router.group(model_id)
    if group is not None and (card := _group_card(gateway, group)) is not None:
        return card
    raise ModelNotFound(f"The model '{model_id}' does not exist or you do not have access to it.",
                        param="model")


def _group_card(gateway: Gateway, group: ModelGroup) -> dict[str, Any] | None:
    """A group is listed once, as one model; its members are listed as themselves too. A group none of
    whose members is served is not listed (a request for it is a 503 naming them)."""
    served = {m.id: m for m in gateway.router.models()}
    members = [served[m.model] for m in group.members if m.model in served]
    if not members:
        return None
    return {"id": group.id, "object": "model", "created": 0, "owned_by": "iir", "task": members[0].task,
            "status": "available", "group": {"strategy": group.strategy,
                                             "members": [m.id for m in members]},
            "tags": sorted({t for m in members for t in m.tags})}


def _model_card(gateway: Gateway, spec: ModelSpec) -> dict[str, Any]:
    # OpenAI's fields, then ours: the SDKs keep fields they don't know.
    entry = gateway.router.entry(spec.id)
    return {"id": spec.id, "object": "model", "created": 0, "owned_by": spec.owner, "task": spec.task,
            "status": entry.status if entry else "available", "tags": spec.tags,
            "cost_per_1k_tokens": entry.cost_per_1k_tokens if entry else spec.cost_per_1k_tokens}
