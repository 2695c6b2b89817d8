"""``ModelReplica``: one deployment per local model; Ray places it by the model's resources."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from serve_app.engines.base import InferenceEngine
from serve_app.engines.factory import build_local_engine
from serve_app.registry.catalog import ModelSpec
from serve_app.schemas import EmbeddingRequest, GenerateRequest


@serve.deployment
class ModelReplica:
    def __init__(self, spec: ModelSpec) -> None:
        self._engine: InferenceEngine = build_local_engine(spec)

    async def generate(self, request: GenerateRequest) -> dict[str, Any]:
        return await self._engine.generate(request)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        async for chunk in self._engine.stream(request):
            yield chunk

    async def embed(self, request: EmbeddingRequest) -> dict[str, Any]:
        return await self._engine.embed(request)

    async def infer(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self._engine.infer(payload)

    async def check_health(self) -> None:
        """Also Serve's own replica health check: a failing engine gets the replica restarted."""
        await self._engine.check_health()
