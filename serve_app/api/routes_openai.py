"""OpenAI-compatible routes and the generic ``/infer``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from serve_app.api import sse
from serve_app.api.deps import CurrentKey, GatewayDep
from serve_app.infer import run_infer
from serve_app.router import AUTO_MODELS, Route
from serve_app.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, InferRequest

router = APIRouter()


def _route_headers(route: Route) -> dict[str, str]:
    headers = {"x-iir-model": route.spec.id}
    if route.classification is not None:
        headers["x-iir-category"] = route.classification.category
    return headers


def _prompt_text(body: ChatCompletionRequest | CompletionRequest) -> str:
    if isinstance(body, CompletionRequest):
        return "\n".join(body.prompts())
    users = [m.text() for m in body.messages if m.role == "user"]
    return users[-1] if users else body.messages[-1].text()


async def _generate(request: Request, gateway: GatewayDep,
                    body: ChatCompletionRequest | CompletionRequest) -> Any:
    prompt = _prompt_text(body) if body.model in AUTO_MODELS else ""
    route = await gateway.router.resolve(body.model, prompt)
    body = body.model_copy(update={"model": route.spec.id})
    headers = _route_headers(route)
    if not body.stream:
        result = await route.engine.generate(body)
        result["model"] = route.spec.id
        return _json(result, headers)
    first, rest = await sse.first_and_rest(aiter(route.engine.stream(body)))
    request_id = request.scope.get("state", {}).get("request_id", "-")
    events = sse.event_stream(first, rest, model_id=route.spec.id, request_id=request_id)
    headers["cache-control"] = "no-cache"
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


def _json(payload: dict[str, Any], headers: dict[str, str]) -> Response:
    return JSONResponse(payload, headers=headers)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, gateway: GatewayDep,
                           _: CurrentKey) -> Any:
    return await _generate(request, gateway, body)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, gateway: GatewayDep, _: CurrentKey) -> Any:
    return await _generate(request, gateway, body)


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, gateway: GatewayDep, _: CurrentKey) -> Response:
    route = await gateway.router.resolve(body.model, "")
    result = await route.engine.embed(body.model_copy(update={"model": route.spec.id}))
    result["model"] = route.spec.id
    return _json(result, _route_headers(route))


@router.get("/v1/models")
async def list_models(gateway: GatewayDep, _: CurrentKey) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(m.id, m.owner, m.task) for m in gateway.router.models()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, gateway: GatewayDep, _: CurrentKey) -> dict[str, Any]:
    route = await gateway.router.resolve(model_id, "")
    return _model_card(route.spec.id, route.spec.owner, route.spec.task)


def _model_card(model_id: str, owner: str, task: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owner, "task": task}


@router.post("/infer")
async def infer(body: InferRequest, gateway: GatewayDep, _: CurrentKey) -> Response:
    prompt = body.input.get("prompt") or body.input.get("text") or ""
    route = await gateway.router.resolve(body.model, str(prompt))
    return _json(await run_infer(route, body.input), _route_headers(route))
