"""OpenAI-compatible model routes, the generic ``/infer`` and ``/v1/classify``: parse, run the pipeline
(``serve_app/ingress/pipeline.py``), render."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from serve_app.errors import ModelNotFound
from serve_app.ingress.deps import Call, GatewayDep, InferenceKey
from serve_app.ingress.gateway import Gateway
from serve_app.ingress.jobs import ClassifyJob, EmbedJob, GenerateJob, InferJob
from serve_app.ingress.render import render
from serve_app.registry.catalog import ModelSpec
from serve_app.schemas import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    InferRequest,
)

router = APIRouter()




@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, call: Call) -> Response:
    return render(call.ctx, await call.pipeline.run(call.ctx, GenerateJob(body, call.headers)))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, call: Call) -> Response:
    return render(call.ctx, await call.pipeline.run(call.ctx, GenerateJob(body, call.headers)))


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, call: Call) -> Response:
    return render(call.ctx, await call.pipeline.run(call.ctx, EmbedJob(body)))


@router.post("/infer")
async def infer(body: InferRequest, call: Call) -> Response:
    return render(call.ctx, await call.pipeline.run(call.ctx, InferJob(body)))


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, call: Call) -> Response:
    return render(call.ctx, await call.pipeline.run(call.ctx, ClassifyJob(body)))


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
